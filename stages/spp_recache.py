"""Stage ``spp_recache``: the sppnet recipe's feature cache, fc features of the fine-tuned fc layers.

Reads shard ``K`` of the SPP pyramids (``features_cache/spp/<split>/shard-K.h5``,
stage ``spp_features``) and runs each image's pyramids through the fine-tuned
fc6-fc7 and fc8 (:func:`stages.models.spp_head.load_head`, eval mode, no dropout)
in batches of :data:`BATCH_ROWS` rows.

Output per shard: ``features_cache/features/sppnet/<split>/shard-K.h5``, the
feature-cache format of :mod:`stages.data.featureset`, covering the same images in
the same order: rows ``boxes``, ``gt_label``, ``iou`` and ``pool`` copied from
the pyramid shard, ``fc (M, hidden)`` (fc7 after ReLU; ``features.precision``,
gzip level ``features.compression``) and ``scores (M, C + 1) float32`` (softmax,
column 0 = background); per-image ``widths``, ``heights``; attributes
``classes``, ``split``, ``shard_index``, ``num_shards``, ``recipe`` (``sppnet``),
``levels``, ``pool_dim``, ``fc_dim`` and the provenance. ``shard-K.timing.json``
holds the wall-clock figures.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stages.core import runs
from stages.core.config import FeatureParams
from stages.core.device import pick_device
from stages.core.layout import spp_shard
from stages.core.provenance import code_version, file_digest
from stages.core.store import ArtifactError, PerImageReader, create_per_image
from stages.data.featureset import IMAGE_DATASETS, feature_row, region_rows
from stages.models.spp_head import SppHead, load_head

RECIPE = "sppnet"
BATCH_ROWS = 1024  # pyramids per pass through the fc layers: memory is bounded by this, not by regions per image


def head_outputs(head: SppHead, pool: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """``(M, pool_dim)`` pyramids -> ``(M, hidden)`` float32 fc7 features and ``(M, C + 1)`` float32 softmax scores."""
    fc, scores = [], []
    with torch.inference_mode():
        for start in range(0, len(pool), BATCH_ROWS):
            x = torch.from_numpy(pool[start:start + BATCH_ROWS]).to(device, non_blocking=True)
            hidden = head.fc7(x)
            fc.append(hidden.cpu().numpy())
            scores.append(torch.softmax(head.classifier(hidden), dim=1).cpu().numpy())
    if not fc:
        return np.zeros((0, head.fc_dim), np.float32), np.zeros((0, head.classifier.out_features), np.float32)
    return np.concatenate(fc), np.concatenate(scores)


def run(features: FeatureParams, split: str, shard: int, num_shards: int, head_path: Path, out_path: Path) -> None:
    """Write the sppnet feature cache of shard ``shard`` of ``split`` with the head at ``head_path``."""
    device = pick_device()
    head = load_head(head_path).to(device)
    with PerImageReader([spp_shard(split, shard)]) as pyramids:
        pyramids.check_shards(num_shards, [shard])
        classes = [str(c) for c in pyramids.json_attr("classes")]
        pool_dim = int(pyramids.attrs["pool_dim"])
        if classes != head.classes or pool_dim != head.pool_dim:
            raise ArtifactError(f"{pyramids.paths[0]} ({len(classes)} classes, pyramids of {pool_dim}) does not fit "
                                f"{head_path} (stale artifact; rerun spp_finetune)")
        hidden = head.fc_dim
        rows = {
            **region_rows(len(classes)),
            "pool": feature_row(pool_dim, features.precision, features.compression),
            "fc": feature_row(hidden, features.precision, features.compression),
            "scores": feature_row(len(classes) + 1, "float32", features.compression),
        }
        attrs = {
            "stage": "spp_recache",
            "classes": classes,
            "split": split,
            "shard_index": shard,
            "num_shards": num_shards,
            "recipe": RECIPE,
            "levels": pyramids.json_attr("levels"),
            "pool_dim": pool_dim,
            "fc_dim": hidden,
            "params": {"features.precision": features.precision, "features.compression": features.compression},
            "code_version": code_version("spp_recache"),
            "inputs": {"spp": file_digest(pyramids.paths[0]), "head": file_digest(head_path)},
        }
        wall = time.perf_counter()
        with create_per_image(out_path, rows, attrs, IMAGE_DATASETS) as writer:
            for i in tqdm(range(len(pyramids)), desc=f"spp_recache {split} shard {shard}", unit="img"):
                copied = {name: pyramids.rows(name, i) for name in ("boxes", "gt_label", "iou", "pool")}
                fc, scores = head_outputs(head, copied["pool"], device)
                writer.append(pyramids.image_ids[i], {**copied, "fc": fc.astype(features.precision), "scores": scores},
                              widths=pyramids.value("widths", i), heights=pyramids.value("heights", i))
        seconds = time.perf_counter() - wall
        timing = {"images": len(pyramids), "regions": int(pyramids.counts().sum()), "wall_seconds": seconds,
                  "seconds_per_image": seconds / max(1, len(pyramids))}
    runs.record(out_path, timing)
