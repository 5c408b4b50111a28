"""R-CNN feature stage: throughput against the bare network and a naive loop, and the cache's bytes per region.

For each dataset (the generated default one, and BCCD's test split when
``../shared/datasets/BCCD`` exists) proposals are computed for the first
:data:`IMAGES` test images (shard 0 of ``round(n / IMAGES)``), then, on those
same regions, in one run:

- stage: ``stages.features.run`` of that shard, start to finish (model
  loading, worker start-up, warping, forward passes, HDF5 writing), with the
  ``imagenet`` model (the same network as ``finetuned``, without needing the
  finetune stage), with the default number of loader workers
  (``cpu_count() - 1``) and with ``cpu_count()``;
- bare forward: the backbone's ``forward_features`` alone on random tensors,
  same batch size, input size, channels-last layout and number of regions,
  under ``inference_mode`` (the ceiling: no warping, no I/O), measured before
  and after the stage runs, the better of the two kept;
- naive loop: the first :data:`NAIVE_REGIONS` regions, each warped and run
  through the same network on its own (images decoded once each).

Reported: regions per second of each, the stage's share of the bare forward
pass (target >= 0.85) and its speed-up over the naive loop (target >= 10x),
whether the naive loop's fc features equal the cached ones (float16 rounding),
and the stored bytes per region of ``pool``, ``fc`` and ``scores`` against the
same columns in uncompressed float32 (target <= 1/2).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from bench.common import on_datasets, print_table
from stages import features, proposals
from stages.core import layout
from stages.core.config import Config, FeatureParams
from stages.core.store import PerImageReader
from stages.data.images import load_image
from stages.ops.warp import to_tensor_batch, warp_regions

IMAGES = 8
NAIVE_REGIONS = 200
FEATURE_DATASETS = ("pool", "fc", "scores")


def imagenet(cfg: Config) -> FeatureParams:
    """``features`` with the ``imagenet`` model: the same network as ``finetuned``, no finetune stage needed."""
    return dataclasses.replace(cfg.features, model="imagenet")


def propose(cfg: Config, split: str) -> int:
    """Proposals of shard 0 of ``split`` cut into shards of about IMAGES images; returns the number of shards."""
    with PerImageReader([layout.index_file(split)]) as index:
        num_shards = max(1, round(len(index) / IMAGES))
    proposals.run(cfg.proposals, "skip", split, 0, num_shards, layout.proposals_shard(split, 0))
    return num_shards


def stage(cfg: Config, split: str, num_shards: int, workers: int) -> tuple[Path, float]:
    """Run the feature stage on shard 0; its output file and regions per second of the whole run."""
    out = layout.features_dir("rcnn", split) / f"shard-0-{workers}-workers.h5"
    start = time.perf_counter()
    features.run(imagenet(cfg), cfg.finetune, split, 0, num_shards, cfg.data.train_split, out, num_workers=workers)
    seconds = time.perf_counter() - start
    return out, json.loads(layout.timing_file(out).read_text())["regions"] / seconds


def network(cfg: Config, classes: list[str]) -> torch.nn.Module:
    """The stage's ``imagenet`` network, prepared as the stage prepares it (CPU, channels-last, eval)."""
    model, _ = features.load_network(imagenet(cfg), cfg.finetune, classes)
    return model.to(memory_format=torch.channels_last).eval()


def bare_forward(model: torch.nn.Module, regions: int, batch_size: int) -> float:
    """Regions per second of ``forward_features`` alone over ``regions`` random inputs in full batches."""
    size = model.input_size
    batch = torch.randn(batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, regions, batch_size):
            model.forward_features(batch[: min(batch_size, regions - first)])
    return regions / (time.perf_counter() - start)


def naive_loop(model: torch.nn.Module, cache: PerImageReader, root: Path, paths: list[str]) -> tuple[float, np.ndarray]:
    """Regions per second warping and forwarding one region at a time; the ``(n, Df)`` fc features."""
    fill = tuple(255 * m for m in model.mean)
    fcs, done = [], 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i, path in enumerate(paths):
            image = load_image(root / path)
            for box in cache.rows("boxes", i)[: NAIVE_REGIONS - done]:
                region = warp_regions(image, box[None], model.input_size, model.padding, fill)
                x = to_tensor_batch(region, model.mean, model.std)
                _, fc = model.forward_features(x.contiguous(memory_format=torch.channels_last))
                torch.softmax(model.classifier(fc), dim=1)
                fcs.append(fc.numpy())
                done += 1
            if done == NAIVE_REGIONS:
                break
    return done / (time.perf_counter() - start), np.concatenate(fcs)


def stored_bytes(path: Path) -> tuple[float, float]:
    """Stored bytes per region of the feature datasets, and the same columns as uncompressed float32."""
    with h5py.File(path) as f:
        regions = f["fc"].shape[0]
        stored = sum(f[name].id.get_storage_size() for name in FEATURE_DATASETS)
        columns = sum(f[name].shape[1] for name in FEATURE_DATASETS)
    return stored / regions, 4.0 * columns


def measure(name: str, cfg: Config, split: str) -> dict:
    num_shards = propose(cfg, split)
    with PerImageReader([layout.index_file(split)]) as index, \
            PerImageReader([layout.proposals_shard(split, 0)]) as shard:
        model = network(cfg, [str(c) for c in index.json_attr("classes")])
        regions = int(shard.counts().sum())
    bare_before = bare_forward(model, regions, cfg.features.batch_size)
    default, cores = features.default_workers(0), os.cpu_count() or 1
    out, stage_rate = stage(cfg, split, num_shards, default)
    all_cores_rate = stage(cfg, split, num_shards, cores)[1] if cores != default else stage_rate
    # the better of two measurements around the stage runs: the ceiling, however busy the machine was
    bare_rate = max(bare_before, bare_forward(model, regions, cfg.features.batch_size))
    with PerImageReader([out]) as cache, PerImageReader([layout.index_file(split)]) as index:
        paths = [index.value("paths", index.position(image_id)) for image_id in cache.image_ids]
        naive_rate, naive_fc = naive_loop(model, cache, Path(index.attrs["data_root"]), paths)
        cached_fc = np.concatenate([cache.rows("fc", i) for i in range(len(cache))])[: len(naive_fc)]
    per_region, float32_per_region = stored_bytes(out)
    scale = float(np.abs(naive_fc).max())
    return {
        "dataset": name,
        "images": len(paths),
        "regions": regions,
        f"stage r/s ({default} workers, default)": stage_rate,
        f"stage r/s ({cores} workers)": all_cores_rate,
        "bare forward r/s": bare_rate,
        "stage / bare": stage_rate / bare_rate,
        "naive r/s": naive_rate,
        "stage / naive": stage_rate / naive_rate,
        "same fc": bool(np.allclose(cached_fc.astype(np.float32), naive_fc, rtol=2e-3, atol=2e-3 * scale)),
        "bytes/region": per_region,
        "float32 bytes/region": float32_per_region,
        "stored / float32": per_region / float32_per_region,
    }


def main() -> list[dict]:
    rows = on_datasets(lambda name, cfg: measure(name, cfg, cfg.data.test_split))
    print(f"\nFeature stage ({IMAGES} test images, imagenet model, batch of regions as features.batch_size) vs the "
          f"bare forward pass (target >= 0.85) and a naive one-region loop (target >= 10x); stored bytes per "
          f"region vs float32 (target <= 0.5):")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
