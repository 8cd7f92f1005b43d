"""Local folders and archives loaded directly: search, formats, conversion, crop, skips, errors."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmctl.data import download, load_images
from ddpmctl.errors import DataError, UsageError


def _save(path: Path, arr: np.ndarray, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt, **({"quality": 95} if path.suffix in (".jpg", ".jpeg") else {}))


def _solid(h, w, rgb):
    return np.full((h, w, 3), rgb, dtype=np.uint8)


def test_recursive_mixed_formats_and_skips(tmp_path):
    d = tmp_path / "pics"
    _save(d / "a.png", _solid(20, 20, (255, 0, 0)))
    _save(d / "sub" / "b.jpg", _solid(30, 30, (0, 255, 0)))
    _save(d / "sub" / "deeper" / "c.webp", _solid(25, 25, (0, 0, 255)))
    _save(d / "sub" / "D.JPEG", _solid(16, 16, (255, 255, 0)))
    (d / "notes.txt").write_text("not an image")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    events = []
    data = load_images(str(d), image_size=8, channels=3, on_event=events.append)
    assert data.images.shape == (4, 3, 8, 8) and data.images.dtype == torch.uint8
    # Sorted by relative path: a.png, sub/D.JPEG, sub/b.jpg, sub/deeper/c.webp
    means = data.images.float().mean((2, 3))
    assert means[0].argmax() == 0 and means[2].argmax() == 1 and means[3].argmax() == 2
    assert means[1][0] > 200 and means[1][1] > 200  # yellow
    sk = data.info["skipped"]["train"]
    assert sk["undecodable or truncated image"]["count"] == 1
    assert sk["not an image file"]["count"] == 1
    assert any(e["event"] == "skipped" and "broken.png" in e["examples"] for e in events)
    progress = [e for e in events if e["event"] == "progress"]
    assert progress[-1]["final"] and progress[-1]["done"] == 5 and "images_per_s" in progress[-1]


def test_grayscale_and_rgb_conversion(tmp_path):
    d = tmp_path / "mix"
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    Image.fromarray(gray, "L").save(d.mkdir() or d / "g.png")
    _save(d / "rgb.png", _solid(16, 16, (200, 100, 50)))
    rgb = load_images(str(d), image_size=16, channels=3).images
    assert rgb.shape == (2, 3, 16, 16)
    assert torch.equal(rgb[0, 0], rgb[0, 1]) and torch.equal(rgb[0, 1], rgb[0, 2])  # L -> RGB: repeated
    assert torch.equal(rgb[0, 0], torch.from_numpy(gray))
    lum = load_images(str(d), image_size=16, channels=1).images
    assert lum.shape == (2, 1, 16, 16)
    expected = round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)  # ITU-R 601-2 luma
    assert abs(int(lum[1, 0, 8, 8]) - expected) <= 1


def test_centre_crop(tmp_path):
    img = _solid(20, 40, (255, 0, 0))
    img[:, 10:30] = (0, 255, 0)  # the centred 20x20 square is green, the sides red
    _save(tmp_path / "wide" / "x.png", img)
    out = load_images(str(tmp_path / "wide"), image_size=10, channels=3).images[0]
    assert (out[1] > 240).all() and (out[0] < 15).all()


def test_exif_orientation_applied(tmp_path):
    img = _solid(20, 40, (0, 0, 255))
    img[:, 10:30] = (255, 255, 255)
    im = Image.fromarray(img)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: the decoded image becomes 40 high, 20 wide
    (tmp_path / "ex").mkdir()
    im.save(tmp_path / "ex" / "r.jpg", exif=exif, quality=95)
    out = load_images(str(tmp_path / "ex"), image_size=10, channels=3).images[0].float()
    # After rotation the centre square spans the white band's middle rows: all white.
    assert out.mean() > 230


def test_transparency_flattened_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent
    (tmp_path / "t").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t" / "a.png")
    out = load_images(str(tmp_path / "t"), image_size=8, channels=3).images
    assert (out == 255).all()


def test_empty_folder_is_an_error(tmp_path):
    d = tmp_path / "empty"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "readme.md").write_text("x")
    with pytest.raises(DataError) as exc:
        load_images(str(d), image_size=8, channels=3)
    msg = str(exc.value)
    assert str(d) in msg and ".png" in msg and ".jpg" in msg and ".webp" in msg


def test_missing_path_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such folder"):
        load_images("./nowhere", image_size=8, channels=3)


def test_local_zip_and_tar_gz(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_solid(12, 12, (10, 20, 30))).save(buf, format="PNG")
    png = buf.getvalue()
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as zf:
        zf.writestr("imgs/one.png", png)
        zf.writestr("imgs/two.png", png)
        zf.writestr("imgs/info.txt", "x")
    with tarfile.open(tmp_path / "set.tar.gz", "w:gz") as tf:
        for n in ("a/one.png", "a/two.png", "a/three.png"):
            ti = tarfile.TarInfo(n)
            ti.size = len(png)
            tf.addfile(ti, io.BytesIO(png))
    z = load_images(str(tmp_path / "set.zip"), image_size=6, channels=3)
    assert z.name == "set" and z.images.shape == (2, 3, 6, 6)
    assert z.info["skipped"]["train"]["not an image file"]["count"] == 1
    t = load_images(str(tmp_path / "set.tar.gz"), image_size=6, channels=1)
    assert t.images.shape == (3, 1, 6, 6)


def test_prepared_folder_auto_grayscale_and_convert_on_load(tmp_path):
    d = tmp_path / "digits"
    for i in range(5):
        Image.fromarray(np.full((10, 10), i * 40, np.uint8), "L").save(d.mkdir(exist_ok=True) or d / f"{i}.png")
    res = download(str(d), size=8)
    assert res.info["channels"] == 1 and res.info["counts"] == {"train": 5}
    assert not any(p.name.startswith(".tmp") for p in res.path.parent.iterdir())
    arr = np.load(res.path / "images_train.npy", allow_pickle=False)
    assert arr.shape == (5, 1, 8, 8) and arr.dtype == np.uint8
    events = []
    data = load_images("digits", image_size=16, channels=3, on_event=events.append)
    assert data.images.shape == (5, 3, 16, 16)
    assert data.info["prepared_size"] == 8 and data.info["size"] == 16
    assert [e for e in events if e["event"] == "convert"][0]["from_size"] == 8


def test_process_pool_decoding_matches_threads(tmp_path):
    from ddpmctl.data.decode import Preprocess, decode_many

    rng = np.random.default_rng(1)
    items = []
    for i in range(40):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (30, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
        items.append((f"{i}.png", buf.getvalue()))
    items.insert(7, ("bad.png", b"garbage"))
    pp = Preprocess(12, 3)
    threads = decode_many(iter(items), len(items), pp, processes=False)
    procs = decode_many(iter(items), len(items), pp, processes=True)
    assert procs.count == threads.count == 40
    assert np.array_equal(procs.array, threads.array)
    assert procs.skipped.counts == threads.skipped.counts == {"undecodable or truncated image": 1}


def _class_tree(root: Path) -> Path:
    """pets/cat: 3 bright images and one broken file; pets/dog: 2 dark images."""
    for cls, value, n in (("cat", 200, 3), ("dog", 40, 2)):
        (root / "pets" / cls).mkdir(parents=True)
        for i in range(n):
            _save(root / "pets" / cls / f"{i}.png", _solid(12, 12, (value, value, value)))
    (root / "pets" / "cat" / "broken.png").write_bytes(b"not a png")
    return root / "pets"


def _check_labels(data) -> None:
    assert data.classes == ["cat", "dog"]
    bright = data.images.float().mean(dim=(1, 2, 3)) > 120
    assert data.labels.tolist() == [0 if b else 1 for b in bright.tolist()]
    assert sorted(data.labels.tolist()) == [0, 0, 0, 1, 1]  # the broken file is skipped, labels stay aligned


def test_class_folders_give_labels_read_directly_and_prepared(tmp_path):
    pets = _class_tree(tmp_path)
    _check_labels(load_images(str(pets), image_size=8, channels=3))
    res = download(str(pets), size=8)
    assert res.info["classes"] == ["cat", "dog"] and res.info["labels"] == {"train": "labels_train.npy"}
    _check_labels(load_images("pets", image_size=8, channels=3))
    labels = res.path / "labels_train.npy"  # a changed label file is refused, never trusted
    np.save(labels, np.array([1, 1, 1, 0, 0], dtype=np.int64), allow_pickle=False)
    with pytest.raises(DataError, match="checksum"):
        load_images("pets", image_size=8, channels=3)


def test_loose_images_and_single_class_folders_have_no_labels(tmp_path):
    (tmp_path / "loose").mkdir()
    for i in range(2):
        _save(tmp_path / "loose" / f"{i}.png", _solid(8, 8, (9, 9, 9)))
    (tmp_path / "one" / "cat").mkdir(parents=True)
    _save(tmp_path / "one" / "cat" / "a.png", _solid(8, 8, (9, 9, 9)))
    for d in ("loose", "one"):
        data = load_images(str(tmp_path / d), image_size=8, channels=3)
        assert data.labels is None and data.classes is None
