"""The built-in shapes dataset: deterministic, well-formed, varied, and actually three kinds of shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpmctl.data import load_images
from ddpmctl.data.shapes import KINDS, make_shapes


def test_shapes_dtype_shape_and_info():
    d = load_images("shapes", image_size=32, channels=3)
    assert d.name == "shapes"
    assert d.images.dtype == torch.uint8 and d.images.shape == (4096, 3, 32, 32)
    assert d.images.is_contiguous() and d.images.device.type == "cpu"
    assert d.info["count"] == 4096 and d.info["split"] == "train" and d.info["size"] == 32
    test = load_images("shapes", image_size=16, channels=1, split="test")
    assert test.images.shape == (512, 1, 16, 16)


def test_shapes_deterministic_and_splits_differ():
    a = load_images("shapes", image_size=32, channels=3).images
    b = load_images("shapes", image_size=32, channels=3).images
    assert torch.equal(a, b)
    t = load_images("shapes", image_size=32, channels=3, split="test").images
    assert not torch.equal(a[:512], t)


def test_shapes_images_differ():
    x = load_images("shapes", image_size=32, channels=3).images[:256].reshape(256, -1)
    assert torch.unique(x, dim=0).shape[0] == 256


def _fill_ratio(img: np.ndarray) -> float:
    """Foreground pixels / bounding-box area (background = the corner colour)."""
    fg = np.abs(img.astype(int) - img[:, :1, :1].astype(int)).sum(0) > 60
    ys, xs = np.nonzero(fg)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return fg.sum() / box


def test_three_kinds_present_and_recognisable():
    x, kinds = make_shapes(300, 64, 3, seed=7)
    assert set(np.unique(kinds)) == {0, 1, 2}
    ratios = {k: [] for k in range(3)}
    for img, k in zip(x, kinds, strict=True):
        ratios[k].append(_fill_ratio(img))
    means = {KINDS[k]: float(np.mean(v)) for k, v in ratios.items()}
    # Geometry, measured from the pixels: square fills its box, circle pi/4, triangle 1/2.
    assert means["square"] > 0.93
    assert 0.72 < means["circle"] < 0.85
    assert 0.42 < means["triangle"] < 0.6
    # Large and fully inside the frame: the border rows/columns are background.
    for img in x[:50]:
        fg = np.abs(img.astype(int) - img[:, :1, :1].astype(int)).sum(0) > 60
        assert fg.mean() > 0.08
        assert not fg[0].any() and not fg[-1].any() and not fg[:, 0].any() and not fg[:, -1].any()


def test_grayscale_shapes_keep_contrast():
    x, _ = make_shapes(200, 32, 1, seed=3)
    contrast = x.reshape(200, -1).max(1).astype(int) - x.reshape(200, -1).min(1)
    assert contrast.min() >= 60


def test_unknown_split_is_usage_error():
    from ddpmctl.errors import UsageError

    with pytest.raises(UsageError, match="splits"):
        load_images("shapes", image_size=32, channels=3, split="validation")
