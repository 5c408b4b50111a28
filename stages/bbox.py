"""Stage ``bbox``: class-specific ridge box regressors on pool features (R-CNN step 5).

Training samples of class ``c`` are the rows of the training split's feature
cache (proposals and ground-truth rows alike, as in R-CNN) whose ``iou[:, c]``
is above ``min_iou``. A sample's target is the ground-truth box of class ``c``
in the same image (a row with ``gt_label == c``) that overlaps it most (ties:
the first), encoded as R-CNN offsets ``tx, ty, tw, th``
(:func:`stages.ops.boxes.encode_boxes`) and standardised per class (mean and
standard deviation, the latter floored at :data:`STD_FLOOR`; R-CNN whitens with
the full covariance instead).

Features: the cached ``pool`` rows, multiplied by one constant
``feature_scale`` so that their mean L2 norm is ``target_norm``, the mean
being estimated on ``norm_sample`` rows drawn uniformly from all rows of the
split with a generator seeded by ``seed``
(:func:`stages.data.featureset.feature_scale`; R-CNN scales the pool5 features
of its regressors with the same constant as the SVM features, norm 20; a
cache whose sampled rows have no positive mean norm is an error). The scale
matters because ``ridge_lambda`` is absolute.

Each class gets one ridge regression for its four standardised targets,
``sklearn.linear_model.Ridge(alpha=ridge_lambda)`` with an intercept, which
scikit-learn leaves unregularised (R-CNN's ``rcnn_train_bbox_regressor`` appends a
column of ones to the features, so its bias is penalised by lambda like every
weight). Prediction: ``deltas = ((feature_scale * pool) @ W[c] + b[c]) *
target_std[c] + target_mean[c]``, decoded onto the proposal
(:func:`stages.ops.boxes.decode_boxes`). A class without samples is left
untrained and returns its boxes unchanged.

Memory: one pass over the sampled images reads the norm sample's pool rows,
then one pass over all images reads each image's rows; only the norms and the
selected training rows (each once, in the cached dtype) are kept.

Output: one HDF5 file with datasets ``weights (C, Dp, 4) float32``,
``biases (C, 4)``, ``target_mean (C, 4)``, ``target_std (C, 4)`` float32,
``trained (C,) bool``; attributes ``format_version``, ``stage`` (``bbox``),
``feature_scale``, ``classes`` (JSON), ``recipe``, ``params``,
``code_version``, ``inputs`` (digests of the feature shards) and ``stats``
(JSON, per class: ``samples``, ``proposals`` and the mean IoU of the proposal
samples with their targets before and after regression, ``null`` without
proposal samples). Read it back with :func:`load_bbox`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import Ridge
from tqdm import tqdm

from stages.core.config import BboxParams, as_dict
from stages.core.provenance import code_version, file_digest
from stages.core.store import ArtifactError
from stages.data.featureset import FeatureSet, feature_scale
from stages.models.box_regressor import BoxRegressor
from stages.ops.boxes import as_boxes, box_area, box_iou, encode_boxes

STD_FLOOR = 1e-6  # smallest target standard deviation


# --- training samples ----------------------------------------------------------------------------


@dataclass
class Samples:
    """The selected training rows of a split, each row once, and which class uses which row.

    ``pool (N, Dp)`` in the cached dtype, ``boxes (N, 4)``, ``is_gt (N,)``;
    per class ``rows[c]`` indices into them and ``targets[c] (N_c, 4)`` ground-truth boxes.
    """

    pool: np.ndarray
    boxes: np.ndarray
    is_gt: np.ndarray
    rows: list[np.ndarray]
    targets: list[np.ndarray]


def image_targets(
    boxes: np.ndarray, labels: np.ndarray, iou: np.ndarray, min_iou: float, where: str
) -> tuple[np.ndarray, list[tuple[int, np.ndarray, np.ndarray]]]:
    """One image's selected rows and, per class with samples, ``(c, positions among them, target boxes)``.

    ``boxes (M, 4)``, ``labels (M,)`` gt_label, ``iou (M, C)``; a row is selected
    for class ``c`` if ``iou[:, c] > min_iou``; its target is the class-``c``
    ground-truth row overlapping it most.
    """
    selected = iou > min_iou
    chosen = np.flatnonzero(selected.any(axis=1))
    per_class = []
    for c in np.flatnonzero(selected.any(axis=0)):
        positions = np.flatnonzero(selected[chosen, c])
        gt = boxes[labels == c]
        if len(gt) == 0:
            raise ArtifactError(
                f"{where}: boxes overlap class {c} by more than {min_iou} but the image has no ground-truth rows "
                "of it (box regressors train on the training split's cache, which carries ground-truth rows)"
            )
        best = box_iou(boxes[chosen[positions]], gt).argmax(axis=1)
        per_class.append((int(c), positions, gt[best]))
    return chosen, per_class


def collect_samples(features: FeatureSet, min_iou: float) -> Samples:
    """Read the split once, keeping the training rows of every class."""
    num_classes = len(features.classes)
    pools, boxes_kept, is_gt = [], [], []
    rows: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    targets: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    count = 0
    for i in tqdm(range(len(features)), desc="bbox samples", unit="image"):
        boxes, labels = as_boxes(features.rows("boxes", i)), features.rows("gt_label", i)
        where = f"{features.paths[0].parent} image {features.image_ids[i]}"
        chosen, per_class = image_targets(boxes, labels, features.rows("iou", i), min_iou, where)
        if len(chosen) == 0:
            continue
        pools.append(features.rows("pool", i)[chosen])
        boxes_kept.append(boxes[chosen])
        is_gt.append(labels[chosen] >= 0)
        for c, positions, gt in per_class:
            rows[c].append(count + positions)
            targets[c].append(gt)
        count += len(chosen)
    dim = features.dim("pool")
    return Samples(
        pool=np.concatenate(pools) if pools else np.zeros((0, dim), np.float32),
        boxes=np.concatenate(boxes_kept) if boxes_kept else np.zeros((0, 4), np.float32),
        is_gt=np.concatenate(is_gt) if is_gt else np.zeros(0, bool),
        rows=[np.concatenate(r) if r else np.zeros(0, np.int64) for r in rows],
        targets=[np.concatenate(t) if t else np.zeros((0, 4), np.float32) for t in targets],
    )


# --- fitting -------------------------------------------------------------------------------------


def fit_class(x: np.ndarray, deltas: np.ndarray, ridge_lambda: float) -> tuple[np.ndarray, ...]:
    """``(N, Dp)`` scaled features, ``(N, 4)`` offsets -> weights ``(Dp, 4)``, bias, target mean and std ``(4,)``."""
    mean = deltas.mean(axis=0, dtype=np.float64)
    std = np.maximum(deltas.std(axis=0, dtype=np.float64), STD_FLOOR)
    ridge = Ridge(alpha=ridge_lambda, fit_intercept=True).fit(x, (deltas - mean) / std)
    return ridge.coef_.T, ridge.intercept_, mean, std


def paired_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """``(N, 4)``, ``(N, 4)`` -> ``(N,)`` IoU of each box with its partner (0 for two empty boxes)."""
    top_left = np.maximum(boxes1[:, :2], boxes2[:, :2])
    bottom_right = np.minimum(boxes1[:, 2:], boxes2[:, 2:])
    intersection = np.clip(bottom_right - top_left, 0, None).prod(axis=1)
    union = box_area(boxes1) + box_area(boxes2) - intersection
    return np.where(union > 0, intersection / np.maximum(union, 1e-12), 0.0)


def class_stats(model: BoxRegressor, c: int, samples: Samples, pool: np.ndarray) -> dict[str, Any]:
    """Sample counts and the proposal samples' mean IoU with their targets before and after regression.

    ``pool (N_c, Dp)``: the unscaled pool features of class ``c``'s samples.
    """
    rows, targets = samples.rows[c], samples.targets[c]
    proposals = ~samples.is_gt[rows]
    boxes = samples.boxes[rows][proposals]
    stats: dict[str, Any] = {"samples": int(len(rows)), "proposals": int(proposals.sum()),
                             "iou_before": None, "iou_after": None}
    if len(boxes):
        after = model.predict(c, pool[proposals], boxes)
        stats["iou_before"] = round(float(paired_iou(boxes, targets[proposals]).mean()), 6)
        stats["iou_after"] = round(float(paired_iou(after, targets[proposals]).mean()), 6)
    return stats


def train(
    samples: Samples, classes: list[str], ridge_lambda: float, scale: float
) -> tuple[BoxRegressor, list[dict[str, Any]]]:
    """Fit every class that has samples, on its pool features times ``scale``.

    Returns the model and the per-class :func:`class_stats`.
    """
    num_classes, dim = len(classes), samples.pool.shape[1]
    model = BoxRegressor(
        weights=np.zeros((num_classes, dim, 4), np.float32), biases=np.zeros((num_classes, 4), np.float32),
        target_mean=np.zeros((num_classes, 4), np.float32), target_std=np.ones((num_classes, 4), np.float32),
        feature_scale=float(scale), classes=list(classes), trained=np.zeros(num_classes, bool),
    )
    stats = []
    for c in tqdm(range(num_classes), desc="bbox ridge", unit="class"):
        rows = samples.rows[c]
        pool = samples.pool[rows]
        if len(rows):
            deltas = encode_boxes(samples.boxes[rows], samples.targets[c])
            x = pool.astype(np.float32) * np.float32(scale)
            fitted = fit_class(x, deltas, ridge_lambda)
            model.weights[c], model.biases[c], model.target_mean[c], model.target_std[c] = fitted
            model.trained[c] = True
        stats.append(class_stats(model, c, samples, pool))
    return model, stats


def run(params: BboxParams, recipe: str, train_split: str, num_shards: int, out_path: Path) -> None:
    """Train the box regressors of ``recipe`` on the feature cache of ``train_split``; write them to ``out_path``."""
    with FeatureSet(recipe, train_split, num_shards) as features:
        classes = features.classes
        scale = feature_scale(features, "pool", params.target_norm, params.seed, params.norm_sample).scale
        samples = collect_samples(features, params.min_iou)
        inputs = {str(p): file_digest(p) for p in features.paths}
    model, stats = train(samples, classes, params.ridge_lambda, scale)
    for name, s in zip(classes, stats):
        change = f"mean IoU {s['iou_before']:.3f} -> {s['iou_after']:.3f}" if s["proposals"] else "no proposal samples"
        print(f"bbox {recipe} {name}: {s['samples']} samples ({s['proposals']} proposals), {change}", flush=True)
    model.save(out_path, {
        "recipe": recipe,
        "params": {"bbox": as_dict(params)},
        "code_version": code_version("bbox"),
        "inputs": inputs,
        "stats": dict(zip(classes, stats)),
    })
