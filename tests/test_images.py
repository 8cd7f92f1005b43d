"""ddpmctl.images: grids and their labels."""

import pytest
import torch

from ddpmctl.images import make_grid

pytestmark = pytest.mark.numerics  # run again with the AVX2 cap in .ci/run (issue 18)


def test_column_labels_add_a_strip_with_a_label_over_each_column_and_keep_the_grid():
    from ddpmctl.images import label_columns

    grid = make_grid(torch.full((6, 3, 16, 16), 90, dtype=torch.uint8), nrow=3)
    out = label_columns(grid, ["1", "2", "10"], 16)
    strip = out.shape[1] - grid.shape[1]
    assert strip > 0 and out.shape[2] == grid.shape[2] and torch.equal(out[:, strip:], grid)
    for col in range(3):  # ink over each column's cell
        x = 2 + col * 18
        assert (out[:, :strip, x:x + 16] < 128).any()
    wide = label_columns(grid, ["1000000", "2000000", "3000000"], 16)  # too wide: not all labelled, no overlap
    assert wide.shape == out.shape and (wide[:, :strip] < 128).any()
