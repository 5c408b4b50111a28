"""Stage ``recall``: how well the proposals cover the ground truth.

Per split: recall at IoU 0.5 and 0.7 (fraction of ground-truth boxes with a
proposal at least that close), MABO (mean over classes of the average best
overlap) and mean boxes per image. Ground truth marked
``difficult`` is left out, as in VOC evaluation. Also the recall-vs-number-of-
proposals curve, taking each image's first ``k`` proposals in rank order.

Outputs: ``features_cache/reports/proposals.json`` (DVC metrics) and
``features_cache/reports/recall_curve_<split>.csv`` (DVC plots). Proposal
seconds per image are run-to-run facts: ``features_cache/runs/proposals/``.

The same report of a Faster R-CNN RPN's proposals (entries ``rpn_recall_2``
and ``rpn_recall_4``, ``rpn`` = ``m1`` or ``m3``): ``proposals_rpn_<rpn>.json``
and ``recall_curve_rpn_<rpn>_<split>.csv``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stages.core.atomic import write_text
from stages.core.layout import index_file, proposals_dir, recall_curve, rpn_proposals_dir
from stages.core.store import PerImageReader
from stages.ops.boxes import box_iou

THRESHOLDS = (0.5, 0.7)
CURVE_POINTS = (1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1000, 2000, 3000, 5000, 10000)


def best_overlaps(gt: np.ndarray, proposals: np.ndarray, points: tuple[int, ...]) -> np.ndarray:
    """``(G, 4)``, ``(P, 4)`` -> ``(G, len(points))`` best IoU of each box among the first ``k`` proposals."""
    if len(proposals) == 0:
        return np.zeros((len(gt), len(points)), np.float32)
    running_best = np.maximum.accumulate(box_iou(gt, proposals), axis=1)
    columns = np.minimum(points, len(proposals)) - 1
    return running_best[:, columns]


def split_report(index: PerImageReader, proposals: PerImageReader) -> tuple[dict, list[dict]]:
    """Metrics and recall curve of one split."""
    proposals.require_images_of(index)
    num_classes = len(index.json_attr("classes"))
    counts = proposals.counts()
    most = max(1, int(counts.max(initial=1)))
    points = tuple(k for k in CURVE_POINTS if k < most) + (most,)  # the last point: every proposal
    overlaps, labels = [], []
    for i in range(len(index)):
        keep = ~index.rows("gt_difficult", i)
        overlaps.append(best_overlaps(index.rows("gt_boxes", i)[keep], proposals.rows("boxes", i), points))
        labels.append(index.rows("gt_labels", i)[keep])
    overlaps = np.concatenate(overlaps) if overlaps else np.zeros((0, len(points)))
    labels = np.concatenate(labels) if labels else np.zeros(0, np.int32)
    best = overlaps[:, -1]
    per_class = [best[labels == c].mean() for c in range(num_classes) if (labels == c).any()]
    metrics = {
        "images": len(index),
        "gt_boxes": int(len(best)),
        "boxes_per_image": float(counts.mean()) if len(counts) else 0.0,
        **{f"recall@{t}": float((best >= t).mean()) if len(best) else 0.0 for t in THRESHOLDS},
        "mabo": float(np.mean(per_class)) if per_class else 0.0,
    }
    curve = [
        {"proposals": k, **{f"recall@{t}": float((overlaps[:, j] >= t).mean()) if len(best) else 0.0 for t in THRESHOLDS}}
        for j, k in enumerate(points)
    ]
    return metrics, curve


def run(splits: tuple[str, ...], num_shards: int, metrics_path: Path, rpn: str = "") -> None:
    """Write the metrics of every split to ``metrics_path`` and one curve CSV per split: of selective search's
    proposals, or of RPN ``rpn``'s."""
    report = {}
    for split in dict.fromkeys(splits):
        folder = rpn_proposals_dir(rpn, split) if rpn else proposals_dir(split)
        with PerImageReader([index_file(split)]) as index, PerImageReader.sharded(folder, num_shards) as proposals:
            metrics, curve = split_report(index, proposals)
        report[split] = metrics
        header = "proposals," + ",".join(f"recall@{t}" for t in THRESHOLDS)
        lines = [f"{row['proposals']}," + ",".join(f"{row[f'recall@{t}']:.6f}" for t in THRESHOLDS) for row in curve]
        write_text(recall_curve(split, rpn), "\n".join([header, *lines]) + "\n")
    write_text(metrics_path, json.dumps(report, indent=2) + "\n")
