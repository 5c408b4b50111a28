"""SPP-net feature stage against the R-CNN feature stage: seconds per image, same images, same proposals.

For each dataset (the generated default one, and BCCD's test split when
``../shared/datasets/BCCD`` exists), at default parameters, proposals are
computed for the first :data:`IMAGES` test images (shard 0 of
``round(n / IMAGES)`` shards), then both feature stages run on that shard,
start to finish (model loading, decoding, network, HDF5 writing), one after
the other:

- R-CNN: ``stages.features.run`` with ``features.model: imagenet`` (the same
  pre-trained network the SPP branch uses, so no fine-tuning run is needed):
  one warped forward pass per region, at the default ``finetune.input_size``
  (96) and again at R-CNN's 227 (padding 16), the setting of the paper's
  comparison;
- SPP-net: ``stages.spp_features.run``: one conv pass per image and scale,
  every region max-pooled into its pyramid.

Reported: regions per image, seconds per image of each, the speed-ups (target
>= 20x; SPP-net paper: 24-102x), the SPP stage's share spent in its
per-image loop (the rest is start-up), and the stored bytes per region of
each stage's features. R-CNN's cost grows with regions x input_size^2, the
SPP stage's with the scaled image area, so the speed-up depends on both. The
machine may be shared: the CPU speed-ups (CPU seconds of the process and its
loader workers) are less sensitive to other load than the wall-clock ones.

A second table times :func:`stages.spp.pyramid_pool` alone on one image's
worth (2,000 boxes, the 50-bin pyramid, 112 channels on a 43 x 56 map; target
well under 0.5 s), in float32 and float16.
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
from stages import features, proposals, spp_features
from stages.core import layout
from stages.core.config import Config
from stages.core.store import PerImageReader
from stages.ops.spp import pyramid_pool

IMAGES = 8
FEATURE_DATASETS = ("pool", "fc", "scores")


def propose(cfg: Config, split: str) -> int:
    """Proposals of shard 0 of ``split`` cut into shards of about IMAGES images; returns the number of shards."""
    with PerImageReader([layout.index_file(split)]) as index:
        num_shards = max(1, round(len(index) / IMAGES))
    proposals.run(cfg.proposals, "skip", split, 0, num_shards, layout.proposals_shard(split, 0))
    return num_shards


def timed(function, *args) -> tuple[float, float]:
    """Wall-clock and CPU seconds (this process and its finished children: loader workers) of one call."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    function(*args)
    return time.perf_counter() - start, _cpu_seconds() - cpu


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def stored_bytes(path: Path) -> int:
    """Bytes stored for the feature datasets of one artifact."""
    with h5py.File(path, "r") as f:
        return sum(f[name].id.get_storage_size() for name in FEATURE_DATASETS if name in f)


def measure(name: str, cfg: Config) -> dict:
    split = cfg.data.test_split
    num_shards = propose(cfg, split)
    rcnn_out = layout.features_shard("rcnn", split, 0)
    spp_out = layout.spp_shard(split, 0)
    rcnn = dataclasses.replace(cfg.features, model="imagenet")
    rcnn_wall, rcnn_cpu = timed(features.run, rcnn, cfg.finetune, split, 0, num_shards, cfg.data.train_split,
                                rcnn_out)
    paper = dataclasses.replace(cfg.finetune, input_size=227, padding=16)
    paper_wall, paper_cpu = timed(features.run, rcnn, paper, split, 0, num_shards, cfg.data.train_split,
                                  rcnn_out.with_name("shard-0-227.h5"))
    spp_wall, spp_cpu = timed(spp_features.run, cfg.sppnet, cfg.features, cfg.finetune, split, 0, num_shards,
                              cfg.data.train_split, spp_out)
    timing = json.loads(layout.timing_file(spp_out).read_text())
    images, regions = timing["images"], timing["regions"]
    return {
        "dataset": name,
        "images": images,
        "regions/img": regions / images,
        "R-CNN s/img": rcnn_wall / images,
        "SPP s/img": spp_wall / images,
        "speed-up": rcnn_wall / spp_wall,
        "CPU speed-up": rcnn_cpu / spp_cpu,
        "R-CNN 227 s/img": paper_wall / images,
        "speed-up vs 227": paper_wall / spp_wall,
        "CPU speed-up vs 227": paper_cpu / spp_cpu,
        "SPP loop share": timing["wall_seconds"] / spp_wall,
        "R-CNN bytes/region": stored_bytes(rcnn_out) / regions,
        "SPP bytes/region": stored_bytes(spp_out) / regions,
    }


def pooling(repeats: int = 5) -> list[dict]:
    """Best-of-``repeats`` wall time of one image's pyramid pooling at the brief's size."""
    rng = np.random.default_rng(0)
    conv = torch.randn(112, 43, 56)
    xs, ys = rng.integers(0, 56, (2000, 2)), rng.integers(0, 43, (2000, 2))
    cells = np.stack([xs.min(1), ys.min(1), xs.max(1) + 1, ys.max(1) + 1], axis=1)
    rows = []
    for dtype in (torch.float32, torch.float16):
        best = min(timed(pyramid_pool, conv.to(dtype), cells, (6, 3, 2, 1))[0] for _ in range(repeats))
        rows.append({"map": "112 x 43 x 56", "boxes": 2000, "bins": 50, "dtype": str(dtype)[6:], "seconds": best})
    return rows


def main() -> list[dict]:
    rows = on_datasets(measure)
    device = "cuda" if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"\nFeature stages on the first {IMAGES} test images, {device} (target SPP >= 20x faster than R-CNN):")
    print_table(rows)
    print("\nPyramid pooling alone, one image (target well under 0.5 s on the CPU):")
    print_table(pooling())
    return rows


if __name__ == "__main__":
    main()
