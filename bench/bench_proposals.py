"""Proposal stage: all cores vs one process calling OpenCV directly, same images, one run.

For each dataset (the generated default one, and BCCD's test split when
``../shared/datasets/BCCD`` exists) the images are indexed once, then:

- baseline: a plain loop in this process, decoding each image and calling
  OpenCV's selective search (with the same seeds and box filtering);
- ours: the proposal stage (``stages.proposals.run``) with all cores, HDF5
  writing included.

Both must give identical boxes; the ratio of their wall-clock times is the
speed-up. Recall at IoU 0.5 / 0.7, MABO and boxes per image come from the
recall stage's code on the stage's output.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np

from bench.common import on_datasets, print_table
from stages import proposals, recall
from stages.core import layout
from stages.core.config import Config
from stages.core.store import PerImageReader
from stages.data.images import load_image


def baseline(cfg: Config, split: str) -> tuple[list[np.ndarray], float]:
    """One process, one image after another, OpenCV with its default threading."""
    cv2.setNumThreads(-1)
    start = time.perf_counter()
    with PerImageReader([layout.index_file(split)]) as index:
        root = Path(index.attrs["data_root"])
        boxes = [
            proposals.selective_search(
                load_image(root / index.value("paths", i)), cfg.proposals, proposals.image_seed(cfg.proposals.seed, image_id)
            )
            for i, image_id in enumerate(index.image_ids)
        ]
    return boxes, time.perf_counter() - start


def ours(cfg: Config, split: str) -> tuple[list[np.ndarray], float, dict]:
    out = layout.proposals_shard(split, 0)
    start = time.perf_counter()
    proposals.run(cfg.proposals, "skip", split, 0, 1, out, num_workers=0)
    seconds = time.perf_counter() - start
    with PerImageReader([layout.index_file(split)]) as index, PerImageReader([out]) as result:
        boxes = [result.rows("boxes", i) for i in range(len(result))]
        metrics, _ = recall.split_report(index, result)
    return boxes, seconds, metrics


def measure(name: str, cfg: Config, split: str) -> dict:
    base_boxes, base_seconds = baseline(cfg, split)
    our_boxes, our_seconds, metrics = ours(cfg, split)
    identical = len(base_boxes) == len(our_boxes) and all(np.array_equal(a, b) for a, b in zip(base_boxes, our_boxes))
    return {
        "dataset": name,
        "images": metrics["images"],
        "baseline s/img": base_seconds / metrics["images"],
        "ours s/img": our_seconds / metrics["images"],
        "speed-up": base_seconds / our_seconds,
        "identical": identical,
        "recall@0.5": metrics["recall@0.5"],
        "recall@0.7": metrics["recall@0.7"],
        "mabo": metrics["mabo"],
        "boxes/img": metrics["boxes_per_image"],
    }


def main() -> list[dict]:
    rows = on_datasets(lambda name, cfg: measure(name, cfg, cfg.data.test_split), "BCCD test, fast mode")
    print(f"\nProposal stage, all {os.cpu_count()} cores vs one process calling OpenCV directly (target >= 1.8x):")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
