"""Fast R-CNN's region maths: candidate RoIs, hierarchical sampling, OHEM selection, targets and the multi-task loss.

Boxes follow :mod:`stages.ops.boxes`: ``(N, 4)`` float ``x1, y1, x2, y2`` in
continuous pixels. Classes are numbered as the network's outputs: 0 is
background, ``c + 1`` is class ``c``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import nms

from stages.ops.boxes import as_boxes, box_iou, encode_boxes
from stages.ops.sampling import assign_labels

MIN_SIDE = 1.0  # RoIs narrower or lower than this many pixels are dropped: their log-size targets are unbounded


@dataclass(frozen=True)
class ImageRois:
    """One image's candidate RoIs: ``boxes (M, 4)``, ``labels (M,)`` int64, ``max_iou (M,)``, ``gt (M, 4)``.

    ``gt`` is each RoI's best-overlapping ground-truth box (the RoI itself when the image has none).
    """

    boxes: np.ndarray
    labels: np.ndarray
    max_iou: np.ndarray
    gt: np.ndarray

    def take(self, rows: np.ndarray) -> "ImageRois":
        return ImageRois(self.boxes[rows], self.labels[rows], self.max_iou[rows], self.gt[rows])


def image_rois(proposals: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, fg_iou: float) -> ImageRois:
    """The proposals and the ground-truth boxes of one image, labelled by their best ground truth at ``fg_iou``.

    RoIs with a side under :data:`MIN_SIDE` pixels are dropped (degenerate proposals or ground truth).
    """
    boxes = np.concatenate([as_boxes(proposals), as_boxes(gt_boxes)])
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    boxes = boxes[sides >= MIN_SIDE]
    gt_boxes = as_boxes(gt_boxes)
    iou = box_iou(boxes, gt_boxes)
    labels = assign_labels(iou, gt_labels, fg_iou)
    if len(gt_boxes) == 0:
        return ImageRois(boxes, labels, np.zeros(len(boxes), np.float32), boxes.copy())
    best = iou.argmax(axis=1)
    return ImageRois(boxes, labels, iou[np.arange(len(boxes)), best].astype(np.float32), gt_boxes[best])


def sample_rois(
    rng: np.random.Generator, rois: ImageRois, count: int, positive_fraction: float, bg_iou_low: float
) -> np.ndarray:
    """Fast R-CNN's per-image sample: row numbers of at most ``count`` RoIs, foreground first.

    ``round(count * positive_fraction)`` foreground RoIs (label > 0) or all there
    are, then background RoIs (label 0) with ``max_iou >= bg_iou_low`` to fill
    the rest, or all there are; each drawn without replacement. An image with
    few candidates gives a smaller sample, as in the reference implementation;
    one with no background in that band (no object near any proposal) takes
    its background from IoU 0, so that it still contributes.
    """
    foreground = np.flatnonzero(rois.labels > 0)
    background = np.flatnonzero(rois.labels == 0)
    in_band = background[rois.max_iou[background] >= bg_iou_low]
    background = in_band if len(in_band) else background
    num_fg = min(int(round(count * positive_fraction)), len(foreground))
    num_bg = min(count - num_fg, len(background))
    return np.concatenate([rng.choice(foreground, num_fg, replace=False),
                           rng.choice(background, num_bg, replace=False)]).astype(np.int64)


def regression_targets(rois: ImageRois, means: Sequence[float], stds: Sequence[float]) -> np.ndarray:
    """``(M, 4)`` float32 normalised targets ``(t - means) / stds`` of each RoI towards its ground truth."""
    targets = encode_boxes(rois.boxes, rois.gt)
    return ((targets - np.asarray(means, np.float32)) / np.asarray(stds, np.float32)).astype(np.float32)


def roi_losses(logits: Tensor, deltas: Tensor, labels: Tensor, targets: Tensor, loss_lambda: float) -> Tensor:
    """Fast R-CNN's multi-task loss of each RoI: ``(R, K+1)``, ``(R, K+1, 4)``, ``(R,)``, ``(R, 4)`` -> ``(R,)``.

    Log loss of the true class plus ``loss_lambda`` times the smooth L1 loss
    (transition at 1) of the true class's deltas, summed over the 4
    coordinates; background RoIs (label 0) have no box loss. The mini-batch
    loss is the mean over RoIs.
    """
    classification = F.cross_entropy(logits.float(), labels, reduction="none")
    true_deltas = deltas.float()[torch.arange(len(labels), device=labels.device), labels]
    box = F.smooth_l1_loss(true_deltas, targets.float(), beta=1.0, reduction="none").sum(dim=1)
    return classification + loss_lambda * box * (labels > 0)


def ohem_select(losses: Tensor, boxes: Tensor, images: Tensor, per_image: int, nms_iou: float) -> Tensor:
    """OHEM's choice: the indices of the hardest RoIs, at most ``per_image`` of each image.

    ``losses (R,)``, ``boxes (R, 4)``, ``images (R,)`` (the image of each RoI).
    Per image, the RoIs are ordered by decreasing loss, NMS at ``nms_iou`` on
    that order removes those overlapping a harder one, and the first
    ``per_image`` that remain are kept. Returned image by image, hardest first.
    """
    chosen = []
    for image in torch.unique(images):
        members = torch.nonzero(images == image).flatten()
        kept = nms(boxes[members].float(), losses[members].float(), nms_iou)[:per_image]
        chosen.append(members[kept])
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.int64, device=losses.device)
