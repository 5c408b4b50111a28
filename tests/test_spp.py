"""SPP-net maths: multi-scale choice, box projection and pyramid pooling, by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.ops.spp import choose_scale, project_boxes, pyramid_dim, pyramid_pool


def test_choose_scale_closest_to_224_squared():
    boxes = np.array([[0, 0, 224, 224], [0, 0, 448, 448], [0, 0, 100, 100], [10, 10, 10, 10]], np.float32)
    # scaled areas: 224^2 box -> exact at x1; 448^2 -> exact at x0.5; 100^2 -> 2500, 10000, 40000: x2 closest;
    # an empty box has area 0 at every scale: the first wins the tie
    assert choose_scale(boxes, [0.5, 1.0, 2.0]).tolist() == [1, 0, 2, 0]
    assert choose_scale(boxes, [3.0]).tolist() == [0, 0, 0, 0]
    assert choose_scale(np.zeros((0, 4), np.float32), [1.0, 2.0]).shape == (0,)


@pytest.mark.parametrize(
    "box, factor, expected",
    [
        # stride 16, map 4 rows x 8 columns (a 128 x 64 image); cell j is centred at 16 j + 8
        ([0, 0, 64, 64], 1.0, [0, 0, 4, 4]),  # centres 8, 24, 40, 56 all inside
        ([8, 8, 40, 40], 1.0, [1, 1, 2, 2]),  # centres on the corners (8 and 40) are left out: strictly inside
        ([9, 0, 41, 16], 1.0, [1, 0, 3, 1]),  # x: centres 24, 40; y: centre 8 only
        ([0, 0, 128, 64], 1.0, [0, 0, 8, 4]),  # the whole image
        ([0, 0, 64, 64], 0.5, [0, 0, 2, 2]),  # at half size the box spans 32 px: centres 8, 24
        ([100, 20, 104, 24], 1.0, [6, 1, 7, 2]),  # no centre inside: the cell holding the box centre (102, 22)
        ([0, 0, 2, 2], 1.0, [0, 0, 1, 1]),  # tiny box in the corner
        ([120, 50, 140, 70], 1.0, [7, 3, 8, 4]),  # beyond the map's right edge: clipped, one cell kept
        ([250, 10, 260, 60], 1.0, [7, 1, 8, 4]),  # entirely right of the map: its last column
    ],
)
def test_project_boxes_by_hand(box, factor, expected):
    assert project_boxes(np.array([box], np.float32), factor, 16, 4, 8).tolist() == [expected]


def test_project_boxes_always_inside_and_non_empty():
    rng = np.random.default_rng(0)
    xy = rng.uniform(-20, 300, (500, 4))
    boxes = np.concatenate([np.minimum(xy[:, :2], xy[:, 2:]), np.maximum(xy[:, :2], xy[:, 2:])], axis=1)
    cells = project_boxes(boxes, 0.7, 16, 9, 13)
    assert cells.dtype == np.int64
    assert (cells[:, :2] >= 0).all() and (cells[:, 2] <= 13).all() and (cells[:, 3] <= 9).all()
    assert (cells[:, 2:] > cells[:, :2]).all()


def _hand_map() -> torch.Tensor:
    """Two channels on a 3 x 4 map: 0..11 row-major, and its negation."""
    c0 = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return torch.stack([c0, -c0])


def test_pyramid_pool_every_bin_by_hand():
    cells = np.array([[0, 0, 4, 3], [1, 1, 2, 3]])
    out = pyramid_pool(_hand_map(), cells, (1, 2))
    # box 0, the whole map (h 3, w 4). Level 2: rows {0,1} {1,2} (floor(0)..ceil(1.5), floor(1.5)..ceil(3)),
    # columns {0,1} {2,3}. Channel 0 maxima 5 7 / 9 11, channel 1 (negated) 0 -2 / -4 -6.
    # box 1, column 1, rows 1..2 (h 2, w 1): level 2 repeats the single column in both bins.
    assert out.tolist() == [
        [11, 0, 5, 7, 9, 11, 0, -2, -4, -6],
        [9, -5, 5, 5, 9, 9, -5, -5, -9, -9],
    ]
    # levels in the order given
    assert pyramid_pool(_hand_map(), cells, (2, 1)).tolist() == [
        [5, 7, 9, 11, 0, -2, -4, -6, 11, 0],
        [5, 5, 9, 9, -5, -5, -9, -9, 9, -5],
    ]


def test_pyramid_pool_matches_adaptive_max_pool_on_each_crop():
    # torch's adaptive max pooling uses the same bins: floor(i h / l) .. ceil((i + 1) h / l)
    torch.manual_seed(0)
    conv = torch.randn(5, 13, 17)
    rng = np.random.default_rng(1)
    xs, ys = rng.integers(0, 17, (60, 2)), rng.integers(0, 13, (60, 2))
    cells = np.stack([xs.min(1), ys.min(1), xs.max(1) + 1, ys.max(1) + 1], axis=1)
    levels = (6, 3, 2, 1)
    out = pyramid_pool(conv, cells, levels)
    assert out.shape == (60, pyramid_dim(5, levels)) == (60, 5 * 50)
    for row, (x1, y1, x2, y2) in zip(out, cells.tolist()):
        crop = conv[:, y1:y2, x1:x2]
        expected = torch.cat([F.adaptive_max_pool2d(crop, level).reshape(-1) for level in levels])
        assert torch.equal(row, expected)


def test_pyramid_pool_in_half_precision_is_the_cast_of_float32():
    torch.manual_seed(0)
    conv = torch.randn(3, 9, 11) * 50
    cells = np.array([[0, 0, 11, 9], [2, 3, 7, 8], [10, 8, 11, 9]])
    full = pyramid_pool(conv, cells, (1, 2, 3, 6))
    assert torch.equal(pyramid_pool(conv.half(), cells, (1, 2, 3, 6)), full.half())


def test_pyramid_pool_output_length_and_bad_cells():
    conv = torch.zeros(112, 4, 4)
    assert pyramid_pool(conv, np.array([[0, 0, 1, 1]]), (1, 2, 3, 6)).shape == (1, 50 * 112)
    assert pyramid_pool(conv, np.zeros((0, 4), np.int64), (1, 2)).shape == (0, 5 * 112)
    with pytest.raises(ValueError, match="inside the 4x4 map"):
        pyramid_pool(conv, np.array([[0, 0, 5, 1]]), (1,))
    with pytest.raises(ValueError, match="non-empty"):
        pyramid_pool(conv, np.array([[2, 0, 2, 1]]), (1,))
