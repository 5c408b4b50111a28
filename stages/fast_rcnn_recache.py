"""Stage ``fast_rcnn_recache``: a trained Fast R-CNN model's own features as a feature cache, for post-hoc SVMs.

The Fast R-CNN paper (section 5.4) trained SVMs on its fine-tuned fc7 and found
them no better than its softmax; recipe ``<model>_svm`` (``fast_rcnn_svm``)
repeats that here: this stage caches the features, and the unchanged ``svm``,
``bbox``, ``detect`` and ``evaluate`` stages run on them as on the other
feature recipes.

For every image of proposal shard ``K`` of a split, in shard order: one conv
pass of the trained model ``fast_rcnn/<model>.pt``
(:func:`stages.models.fast_rcnn.load_fast_rcnn`, eval mode: no dropout) over the
whole image, resized as ``fast_rcnn_detect`` resizes it (shorter side
``fast_rcnn.scales[0]``, longer at most ``fast_rcnn.max_side``); then the
image's region rows (:func:`stages.data.featureset.image_regions`: its
proposals, and on the training split its ground-truth boxes) through the RoI
head, ``fast_rcnn.roi_chunk`` at a time (:meth:`FastRcnn.region_features`),
so memory is bounded by the chunk, not by the proposals. On CUDA the conv pass
and the head run under autocast (:mod:`stages.core.device`).

Output per shard: ``features_cache/features/<model>_svm/<split>/shard-K.h5``,
the feature-cache format of :mod:`stages.data.featureset`: rows ``boxes``,
``gt_label``, ``iou``, ``pool (M, C * p * p)`` (the RoI-pooled conv features
flattened, Fast R-CNN's pool5: what the ``bbox`` stage's ridge regressors
read), ``fc (M, hidden)`` (fc7 after its ReLU; both in ``features.precision``,
gzip level ``features.compression``) and ``scores (M, K + 1) float32`` (the
model's softmax, column 0 = background: ``detect.scorer: softmax`` on this
cache scores as recipe ``<model>`` does); per-image ``widths``, ``heights``;
attributes ``classes``, ``split``, ``shard_index``, ``num_shards``, ``recipe``,
``model``, ``pool_dim``, ``fc_dim`` and the provenance. The shard's run
record (:mod:`stages.core.runs`) holds the wall-clock figures.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stages.core import runs
from stages.core.config import SVM_SUFFIX, FastRcnnParams, FeatureParams
from stages.core.device import autocast, pick_device
from stages.core.layout import index_file, proposals_shard
from stages.core.provenance import code_version, file_digest
from stages.core.store import ArtifactError, PerImageReader, create_per_image
from stages.data.featureset import IMAGE_DATASETS, feature_row, image_regions, region_rows
from stages.models.fast_rcnn import FC6, FastRcnn, conv_pass, image_rois, load_fast_rcnn, resized_images


def region_features(
    model: FastRcnn, conv: torch.Tensor, rois: torch.Tensor, chunk: int, precision: str
) -> dict[str, np.ndarray]:
    """``pool (M, C * p * p)`` and ``fc (M, hidden)`` in ``precision``, ``scores (M, K + 1)`` float32 of ``(M, 5)``
    RoIs on ``conv``, ``chunk`` RoIs at a time."""
    dtype = getattr(torch, precision)
    parts: dict[str, list[np.ndarray]] = {"pool": [], "fc": [], "scores": []}
    for start in range(0, len(rois), chunk) or [0]:  # no RoIs: one empty pass still gives (0, D) arrays
        with autocast(conv.device):
            pool, fc, scores = model.region_features(conv, rois[start:start + chunk])
        for name, value in (("pool", pool.to(dtype)), ("fc", fc.to(dtype)), ("scores", scores)):
            parts[name].append(value.cpu().numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def _attrs(features: FeatureParams, fast_rcnn: FastRcnnParams, model: FastRcnn, recipe: str, split: str,
           shard: int, num_shards: int, train_split: str, inputs: dict[str, Path]) -> dict:
    return {
        "stage": "fast_rcnn_recache",
        "classes": model.classes,
        "split": split,
        "shard_index": shard,
        "num_shards": num_shards,
        "recipe": recipe + SVM_SUFFIX,
        "model": recipe,
        "pool_dim": model.fc[FC6].in_features,
        "fc_dim": model.hidden_units,
        "params": {
            **{f"fast_rcnn.{k}": getattr(fast_rcnn, k) for k in ("scales", "max_side", "roi_chunk")},
            "features.precision": features.precision,
            "features.compression": features.compression,
            "data.train_split": train_split,
        },
        "code_version": code_version("fast_rcnn_recache"),
        "inputs": {name: file_digest(path) for name, path in inputs.items()},
    }


def run(
    features: FeatureParams,
    fast_rcnn: FastRcnnParams,
    recipe: str,
    split: str,
    shard: int,
    num_shards: int,
    train_split: str,
    model_path: Path,
    out_path: Path,
    num_workers: int = 0,
) -> None:
    """Write recipe ``<recipe>_svm``'s feature cache of proposal shard ``shard`` of ``split`` with Fast R-CNN
    model ``recipe`` (ground-truth rows on ``train_split`` only)."""
    model = load_fast_rcnn(model_path, baked=True)
    device = pick_device()
    model.to(device)
    index_path = index_file(split)
    with PerImageReader([index_path]) as index, PerImageReader([proposals_shard(split, shard)]) as proposals:
        proposals.check_shards(num_shards, [shard])
        classes = [str(c) for c in index.json_attr("classes")]
        if classes != model.classes:
            raise ArtifactError(f"{model_path}: trained for classes {model.classes}, but the {split} index has "
                                f"{classes} (stale model; rerun fast_rcnn_train)")
        positions = [index.position(image_id) for image_id in proposals.image_ids]
        attrs = _attrs(features, fast_rcnn, model, recipe, split, shard, num_shards, train_split,
                       {"index": index_path, "proposals": proposals.paths[0], "model": model_path})
        rows = {**region_rows(len(classes)),
                "pool": feature_row(attrs["pool_dim"], features.precision, features.compression),
                "fc": feature_row(attrs["fc_dim"], features.precision, features.compression),
                "scores": feature_row(len(classes) + 1, "float32", features.compression)}
        root = Path(index.attrs["data_root"])
        loader = resized_images([str(root / index.value("paths", i)) for i in positions], fast_rcnn.scales[0],
                                fast_rcnn.max_side, device, num_workers)
        wall, regions = time.perf_counter(), 0
        with torch.inference_mode(), create_per_image(out_path, rows, attrs, IMAGE_DATASETS) as writer:
            progress = tqdm(zip(positions, loader), total=len(positions),
                            desc=f"fast_rcnn_recache {recipe} {split} shard {shard}", unit="img")
            for k, (i, (image, factor)) in enumerate(progress):
                found = image_regions(proposals.rows("boxes", k), index.rows("gt_boxes", i),
                                      index.rows("gt_labels", i), len(classes), with_gt=split == train_split)
                conv = conv_pass(model, image, device)
                rois = image_rois(found["boxes"], factor).to(device, non_blocking=True)
                cached = region_features(model, conv, rois, fast_rcnn.roi_chunk, features.precision)
                writer.append(index.image_ids[i], {**found, **cached},
                              widths=index.value("widths", i), heights=index.value("heights", i))
                regions += len(found["boxes"])
        seconds = time.perf_counter() - wall
    runs.record(out_path, {"images": len(positions), "regions": regions, "wall_seconds": seconds,
                           "seconds_per_image": seconds / max(1, len(positions))})
