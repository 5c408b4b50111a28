"""Stage ``index``: read and validate a VOC-layout dataset once, for every later stage.

Every split's images are listed, their XML parsed, their image files fully
decoded and their boxes checked. Problems are collected over the whole dataset
first; with ``data.on_error: raise`` the stage then stops before writing
anything and lists every problem, with ``skip`` it drops the bad items, counts
them, prints them and records them in the output. Later stages read only the
index files, never the XML, so they all see the same validated images.

Output per split: ``features_cache/index/<split>.h5`` (see :mod:`stages.core.store`):
``image_ids``, ``paths`` (relative to ``data_root``), ``widths``, ``heights``
``(n,)``; rows ``gt_boxes (K, 4) float32``, ``gt_labels (K,) int32``,
``gt_difficult (K,) bool``; attributes ``classes``, ``data_root``, ``split``,
``problems``, ``clipped_boxes`` and the provenance.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stages.core.config import DataParams, as_dict
from stages.core.provenance import code_version, files_digest
from stages.core.store import RowSpec, create_per_image
from stages.data.voc import (
    DataError,
    ImageRecord,
    Problems,
    build_record,
    discover_classes,
    read_annotations,
    read_split_ids,
)

ROWS = {
    "gt_boxes": RowSpec((4,), np.float32),
    "gt_labels": RowSpec((), np.int32),
    "gt_difficult": RowSpec((), bool),
}
IMAGES = {"paths": str, "widths": np.int32, "heights": np.int32}


def run(data: DataParams, out_dir: Path, num_workers: int = 0) -> None:
    """Validate ``data.root`` and write one index file per split into ``out_dir``."""
    root = Path(data.root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found (data.root in params.yaml)")
    problems = Problems(data.on_error)
    ids = _split_ids(root, data.splits, problems)
    annotations = read_annotations(root, sorted({i for split_ids in ids.values() for i in split_ids}), problems)
    classes = data.classes or discover_classes(list(annotations.values()))
    if not classes:
        raise DataError(f"{root}: no object classes found in the annotations and none given in data.classes")
    records = {
        split: _build_records(root, split_ids, annotations, classes, problems, num_workers)
        for split, split_ids in ids.items()
    }
    problems.raise_if_strict()
    _report(problems)
    for split, split_records in records.items():
        _write(out_dir / f"{split}.h5", data, root, split, split_records, classes, problems)


def _split_ids(root: Path, splits: tuple[str, ...], problems: Problems) -> dict[str, list[str]]:
    """Image ids per split; an image listed in two splits is a problem (train/test leakage)."""
    ids = {split: read_split_ids(root, split, problems) for split in dict.fromkeys(splits)}
    if len(ids) == 2:
        train, test = ids.values()
        shared = set(train) & set(test)
        for image_id in sorted(shared):
            problems.add(root / "ImageSets" / "Main", f"image {image_id!r} is in both {splits[0]} and {splits[1]}")
        ids[splits[1]] = [i for i in test if i not in shared]
    return ids


def _build_records(
    root: Path, ids: list[str], annotations: dict, classes: tuple[str, ...], problems: Problems, num_workers: int
) -> list[ImageRecord]:
    usable = [i for i in ids if i in annotations]
    workers = num_workers or os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:  # decoding releases the GIL
        records = list(
            tqdm(
                pool.map(lambda i: build_record(root, i, annotations[i], classes, problems), usable),
                total=len(usable),
                desc="index: validating images",
                unit="img",
            )
        )
    return [r for r in records if r is not None]


def _report(problems: Problems) -> None:
    for message in problems.messages:
        print(f"warning: skipped: {message}", file=sys.stderr)
    if problems.messages:
        print(f"warning: {len(problems.messages)} item(s) skipped (data.on_error: skip)", file=sys.stderr)
    if problems.clipped_boxes:
        print(f"note: {problems.clipped_boxes} box(es) overshooting the image by <= 1 px were clipped", file=sys.stderr)


def _write(
    path: Path,
    data: DataParams,
    root: Path,
    split: str,
    records: list[ImageRecord],
    classes: tuple[str, ...],
    problems: Problems,
) -> None:
    split_file = f"ImageSets/Main/{split}.txt"
    used = [split_file] + [p for r in records for p in (f"Annotations/{r.image_id}.xml", r.path)]
    attrs = {
        "stage": "index",
        "params": {"data": as_dict(data)},
        "code_version": code_version("index"),
        "inputs": {"dataset": files_digest(root, used)},
        "split": split,
        "data_root": data.root,
        "classes": list(classes),
        "problems": sorted(problems.messages),
        "clipped_boxes": problems.clipped_boxes,
    }
    with create_per_image(path, ROWS, attrs, IMAGES) as writer:
        for r in records:
            rows = {"gt_boxes": r.boxes, "gt_labels": r.labels, "gt_difficult": r.difficult}
            writer.append(r.image_id, rows, paths=r.path, widths=r.width, heights=r.height)
