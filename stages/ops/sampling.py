"""Region matching, label assignment, mini-batch sampling and training curves, in the style of ``torchvision.ops``.

Shared by the training stages and the feature caches their labels come from.
Boxes are ``(N, 4)`` float ``x1, y1, x2, y2`` (:mod:`stages.ops.boxes`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from stages.core.errors import PipelineError
from stages.ops.boxes import as_boxes, box_iou

CURVE_WINDOW = 10  # iterations averaged into each curve row


class SamplingError(PipelineError, ValueError):
    """The training windows cannot make the requested mini-batches."""


def class_iou(boxes: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``(M, 4)``, ``(K, 4)``, ``(K,)`` -> ``(M, num_classes)`` float32 best IoU with the ground truth of each class.

    0 where the image has no ground truth of that class.
    """
    boxes, gt_boxes = as_boxes(boxes), as_boxes(gt_boxes)
    result = np.zeros((len(boxes), num_classes), dtype=np.float32)
    if len(boxes) and len(gt_boxes):
        iou = box_iou(boxes, gt_boxes)
        labels = np.asarray(gt_labels, dtype=np.int64)
        for c in np.unique(labels):
            result[:, c] = iou[:, labels == c].max(axis=1)
    return result


def assign_labels(iou: np.ndarray, gt_labels: np.ndarray, fg_iou: float) -> np.ndarray:
    """``(M, K)`` IoU of each box with each ground truth, ``(K,)`` their classes -> ``(M,)`` int64 labels.

    A box is labelled ``gt_labels[j] + 1``, ``j`` its best-overlapping ground
    truth, if that IoU is at least ``fg_iou``, else 0 (background). Ties go to
    the lower ``j``. The columns may be classes rather than boxes: the
    ``(M, C)`` rows of :func:`class_iou` with ``gt_labels = arange(C)`` label
    each box with its best class (ties to the lower class).
    """
    iou = np.asarray(iou)
    if iou.shape[1] == 0:
        return np.zeros(len(iou), dtype=np.int64)
    best = iou.argmax(axis=1)
    foreground = iou[np.arange(len(iou)), best] >= fg_iou
    return np.where(foreground, np.asarray(gt_labels, dtype=np.int64)[best] + 1, 0)


def sample_batch(
    rng: np.random.Generator, foreground: np.ndarray, background: np.ndarray, batch_size: int, positive_fraction: float
) -> np.ndarray:
    """``(batch_size,)`` window numbers: ``round(batch_size * positive_fraction)`` foreground first, then background.

    Each part is drawn uniformly without replacement, or with replacement when
    there are fewer windows of that kind than the part needs.
    """
    num_fg = int(round(batch_size * positive_fraction))
    parts = []
    for pool, count, kind in ((foreground, num_fg, "foreground"), (background, batch_size - num_fg, "background")):
        if count == 0:
            continue
        if len(pool) == 0:
            raise SamplingError(
                f"no {kind} windows to fill {count} of each mini-batch of {batch_size} "
                f"(fg_iou / positive_fraction, or the proposals and ground truth of the split)"
            )
        parts.append(rng.choice(pool, size=count, replace=len(pool) < count))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def curve_rows(losses: Sequence[float], correct: Sequence[float], every: int) -> list[str]:
    """CSV rows ``iteration,loss,accuracy`` (1-based iteration, means over the last CURVE_WINDOW)."""
    rows = ["iteration,loss,accuracy"]
    n = len(losses)
    for i in range(n):
        if (i + 1) % every and i != n - 1:
            continue
        start = max(0, i + 1 - CURVE_WINDOW)
        rows.append(f"{i + 1},{np.mean(losses[start:i + 1]):.6f},{np.mean(correct[start:i + 1]):.6f}")
    return rows
