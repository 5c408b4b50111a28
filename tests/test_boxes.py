"""Box maths on tiny hand-computed cases (continuous x1, y1, x2, y2; pixel i covers [i, i+1))."""
from __future__ import annotations

import numpy as np
import pytest

from stages.ops.boxes import (
    as_boxes,
    box_area,
    box_iou,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    intersection_over_smaller,
    min_side,
    unique_boxes,
    xywh_to_xyxy,
    xyxy_to_xywh,
)


def test_as_boxes_reshapes_to_contiguous_float32() -> None:
    out = as_boxes([1, 2, 3, 4])
    assert out.shape == (1, 4)
    assert out.dtype == np.float32
    assert out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, [[1, 2, 3, 4]])
    # a non-contiguous view becomes contiguous
    strided = np.arange(16, dtype=np.float64).reshape(4, 4)[::2]
    assert as_boxes(strided).flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(as_boxes(strided), [[0, 1, 2, 3], [8, 9, 10, 11]])


def test_as_boxes_empty() -> None:
    out = as_boxes([])
    assert out.shape == (0, 4)
    assert out.dtype == np.float32


def test_box_area() -> None:
    boxes = np.array(
        [
            [0, 0, 10, 5],  # 10 * 5 = 50
            [2, 3, 3, 4],  # one pixel: 1 * 1 = 1
            [5, 5, 0, 0],  # inverted -> 0
            [0, 0, 0, 10],  # zero width -> 0
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(box_area(boxes), [50, 1, 0, 0])
    assert box_area(np.zeros((0, 4), np.float32)).shape == (0,)


def test_box_iou_hand_computed() -> None:
    a = np.array([[0, 0, 10, 10]], dtype=np.float32)
    b = np.array(
        [
            [5, 5, 15, 15],  # inter 5*5 = 25, union 100 + 100 - 25 = 175 -> 25/175 = 1/7
            [0, 0, 10, 10],  # identical -> 1
            [10, 0, 20, 10],  # shares an edge only -> 0 (continuous coordinates)
            [0, 0, 5, 10],  # inside, half the area: 50 / 100 = 0.5
            [20, 20, 30, 30],  # disjoint -> 0
        ],
        dtype=np.float32,
    )
    iou = box_iou(a, b)
    assert iou.shape == (1, 5)
    assert iou.dtype == np.float32
    np.testing.assert_allclose(iou[0], [25 / 175, 1.0, 0.0, 0.5, 0.0], rtol=1e-6)


def test_box_iou_matrix_orientation() -> None:
    a = np.array([[0, 0, 10, 10], [0, 0, 20, 20]], dtype=np.float32)
    b = np.array([[0, 0, 10, 10]], dtype=np.float32)
    # [0,0,20,20] vs [0,0,10,10]: inter 100, union 400 -> 0.25
    np.testing.assert_allclose(box_iou(a, b), [[1.0], [0.25]], rtol=1e-6)
    np.testing.assert_allclose(box_iou(b, a), [[1.0, 0.25]], rtol=1e-6)


@pytest.mark.parametrize("n, m", [(0, 3), (2, 0), (0, 0)])
def test_box_iou_empty_shapes(n: int, m: int) -> None:
    iou = box_iou(np.zeros((n, 4), np.float32), np.ones((m, 4), np.float32))
    assert iou.shape == (n, m)
    assert iou.dtype == np.float32


def test_clip_boxes() -> None:
    boxes = np.array([[-5, -1, 120, 50], [10, 10, 20, 20]], dtype=np.float64)
    out = clip_boxes(boxes, width=100, height=40)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[0, 0, 100, 40], [10, 10, 20, 20]])


def test_xywh_to_xyxy() -> None:
    # x=10, y=20, w=5, h=7 -> x2 = 15, y2 = 27
    out = xywh_to_xyxy(np.array([[10, 20, 5, 7], [0, 0, 1, 1]], dtype=np.int32))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[10, 20, 15, 27], [0, 0, 1, 1]])
    assert xywh_to_xyxy(np.zeros((0, 4))).shape == (0, 4)


def test_xyxy_to_xywh_inverts_xywh_to_xyxy() -> None:
    boxes = np.array([[10, 20, 5, 7], [0.5, 0, 1.25, 1]])
    out = xyxy_to_xywh(xywh_to_xyxy(boxes))
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, boxes)
    assert xyxy_to_xywh(np.zeros((0, 4))).shape == (0, 4)


def test_min_side() -> None:
    boxes = np.array([[0, 0, 10, 4], [0, 0, 3, 8], [2, 2, 7, 7]], dtype=np.float32)
    np.testing.assert_array_equal(min_side(boxes), [4, 3, 5])
    assert min_side(np.zeros((0, 4), np.float32)).shape == (0,)


def test_unique_boxes_keeps_first_occurrences_in_order() -> None:
    boxes = np.array(
        [
            [1, 1, 2, 2],  # 0 first
            [0, 0, 1, 1],  # 1 first (sorts before box 0, but order must be by position)
            [1, 1, 2, 2],  # 2 duplicate of 0
            [3, 3, 4, 4],  # 3 first
            [0, 0, 1, 1],  # 4 duplicate of 1
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(unique_boxes(boxes), [0, 1, 3])


def test_unique_boxes_empty() -> None:
    assert unique_boxes(np.zeros((0, 4), np.float32)).shape == (0,)


def test_intersection_over_smaller_by_hand():
    big = np.array([[0, 0, 10, 10]], np.float32)
    others = np.array([[2, 2, 4, 4], [5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    # inside: 4/min(100, 4) = 1; half overlap: 50/min(100, 100) = 0.5; disjoint: 0
    np.testing.assert_allclose(intersection_over_smaller(big, others), [[1.0, 0.5, 0.0]])
    assert intersection_over_smaller(big, np.zeros((0, 4), np.float32)).shape == (1, 0)


def test_encode_boxes_by_hand():
    # proposal centre (5, 10), size 10 x 20; target centre (12, 14), size 20 x 20
    deltas = encode_boxes(np.array([[0, 0, 10, 20]], np.float32), np.array([[2, 4, 22, 24]], np.float32))
    assert deltas.dtype == np.float32
    np.testing.assert_allclose(deltas, [[0.7, 0.2, np.log(2), 0.0]], rtol=1e-6, atol=1e-7)


def test_decode_boxes_by_hand():
    boxes = decode_boxes(np.array([[0, 0, 10, 20], [4, 4, 8, 8]], np.float32),
                         np.array([[0.7, 0.2, np.log(2), 0.0], [0, 0, 0, 0]], np.float32))
    assert boxes.dtype == np.float32
    np.testing.assert_allclose(boxes, [[2, 4, 22, 24], [4, 4, 8, 8]], rtol=1e-6, atol=1e-5)


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)

    def random_boxes() -> np.ndarray:
        corners = rng.uniform(0, 200, size=(50, 2))
        return np.concatenate([corners, corners + rng.uniform(1, 100, size=(50, 2))], axis=1).astype(np.float32)

    proposals, targets = random_boxes(), random_boxes()
    np.testing.assert_allclose(decode_boxes(proposals, encode_boxes(proposals, targets)), targets, atol=1e-3)
    assert encode_boxes(np.zeros((0, 4)), np.zeros((0, 4))).shape == (0, 4)
    assert decode_boxes(np.zeros((0, 4)), np.zeros((0, 4))).shape == (0, 4)


def test_zero_size_boxes_stay_finite():
    point = np.array([[5, 5, 5, 5]], np.float32)
    box = np.array([[0, 0, 10, 10]], np.float32)
    assert np.isfinite(encode_boxes(point, box)).all()  # sizes floored at 1e-6: log(10 / 1e-6), not log(inf)
    assert np.isfinite(encode_boxes(box, point)).all()
    np.testing.assert_allclose(decode_boxes(point, np.zeros((1, 4))), point, atol=1e-5)


def test_decode_caps_the_size_deltas():
    # tw, th capped at log(1000 / 16): a 16 x 16 box centred (8, 8) grows to at most 1000 x 1000
    boxes = decode_boxes(np.array([[0, 0, 16, 16]], np.float32), np.array([[0, 0, 100, 100]], np.float32))
    np.testing.assert_allclose(boxes, [[-492, -492, 508, 508]], rtol=1e-5)
    assert np.isfinite(decode_boxes(np.array([[0, 0, 16, 16]], np.float32), np.array([[0, 0, 1e6, -1e6]]))).all()
