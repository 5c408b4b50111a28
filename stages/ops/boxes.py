"""Box maths, in one place, in the style of ``torchvision.ops.boxes``.

Convention everywhere in the project: boxes are ``(N, 4)`` float arrays
``x1, y1, x2, y2`` in continuous pixel coordinates, pixel ``i`` covering
``[i, i + 1)``; a box's width is ``x2 - x1``. Conversions to other conventions
happen only at I/O (see :mod:`stages.data.voc`). Functions take and return NumPy
arrays; IoU is computed with :func:`torchvision.ops.box_iou`, imported on first
use because importing torch takes seconds and most stages never need it.
"""
from __future__ import annotations

import numpy as np


def as_boxes(boxes: np.ndarray | list) -> np.ndarray:
    """Return ``boxes`` as a contiguous ``(N, 4)`` float32 array (``N`` may be 0)."""
    return np.ascontiguousarray(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))


def box_area(boxes: np.ndarray) -> np.ndarray:
    """``(N, 4)`` -> ``(N,)`` areas; zero for empty or inverted boxes."""
    wh = np.clip(boxes[:, 2:] - boxes[:, :2], 0, None)
    return wh[:, 0] * wh[:, 1]


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """``(N, 4)``, ``(M, 4)`` -> ``(N, M)`` float32 intersection over union."""
    if len(boxes1) == 0 or len(boxes2) == 0:
        return np.zeros((len(boxes1), len(boxes2)), dtype=np.float32)
    import torch
    from torchvision.ops import box_iou as torch_box_iou

    return torch_box_iou(torch.from_numpy(as_boxes(boxes1)), torch.from_numpy(as_boxes(boxes2))).numpy()


def intersection_over_smaller(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """``(N, 4)``, ``(M, 4)`` -> ``(N, M)`` intersection area over the smaller of the two areas.

    Unlike IoU, this is high when a small box lies inside a large one.
    """
    top_left = np.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = np.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    intersection = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    return intersection / np.minimum(box_area(boxes1)[:, None], box_area(boxes2)[None, :])


def clip_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """``(N, 4)`` -> ``(N, 4)`` boxes clipped to the image ``[0, width] x [0, height]``."""
    upper = np.array([width, height, width, height], dtype=np.float32)
    return np.clip(boxes, 0, upper).astype(np.float32)


def hflip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """``(N, 4)`` -> ``(N, 4)`` float32 boxes of the image mirrored left to right (``width`` pixels wide)."""
    boxes = as_boxes(boxes)
    return np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """``(N, 4)`` ``x, y, w, h`` (OpenCV ``Rect``) -> ``(N, 4)`` ``x1, y1, x2, y2``."""
    boxes = as_boxes(boxes)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """``(N, 4)`` ``x1, y1, x2, y2`` -> ``(N, 4)`` float64 ``x, y, w, h`` (COCO ``bbox``)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def min_side(boxes: np.ndarray) -> np.ndarray:
    """``(N, 4)`` -> ``(N,)`` the shorter of each box's width and height."""
    return np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])


def unique_boxes(boxes: np.ndarray) -> np.ndarray:
    """``(N, 4)`` -> ``(K,)`` indices of the first occurrence of each distinct box, in order."""
    _, first = np.unique(as_boxes(boxes), axis=0, return_index=True)
    return np.sort(first)


def _centre_size(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(N, 4)`` -> centre x, centre y, width, height, each ``(N,)`` float64 (width, height at least 1e-6)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    width = np.maximum(boxes[:, 2] - boxes[:, 0], 1e-6)
    height = np.maximum(boxes[:, 3] - boxes[:, 1], 1e-6)
    return boxes[:, 0] + width / 2, boxes[:, 1] + height / 2, width, height


def encode_boxes(proposals: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``(N, 4)`` proposals P, ``(N, 4)`` targets G -> ``(N, 4)`` float32 R-CNN regression targets.

    ``tx = (Gx - Px) / Pw``, ``ty = (Gy - Py) / Ph``, ``tw = log(Gw / Pw)``,
    ``th = log(Gh / Ph)`` with ``x, y`` the centre and ``w, h`` the size.
    """
    px, py, pw, ph = _centre_size(proposals)
    gx, gy, gw, gh = _centre_size(targets)
    return np.stack([(gx - px) / pw, (gy - py) / ph, np.log(gw / pw), np.log(gh / ph)], axis=1).astype(np.float32)


def decode_boxes(proposals: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """``(N, 4)`` proposals, ``(N, 4)`` deltas ``tx, ty, tw, th`` -> ``(N, 4)`` float32 boxes; inverse of :func:`encode_boxes`.

    ``tw`` and ``th`` are capped at ``log(1000 / 16)`` so one wild prediction cannot overflow.
    """
    px, py, pw, ph = _centre_size(proposals)
    deltas = np.asarray(deltas, dtype=np.float64).reshape(-1, 4)
    cap = np.log(1000 / 16)
    x, y = px + deltas[:, 0] * pw, py + deltas[:, 1] * ph
    w, h = pw * np.exp(np.minimum(deltas[:, 2], cap)), ph * np.exp(np.minimum(deltas[:, 3], cap))
    return np.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], axis=1).astype(np.float32)
