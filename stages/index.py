"""Stage ``index``: read and validate the dataset once, for every later stage.

The dataset is a VOC folder (``data.format: voc``: its splits from
``ImageSets/Main/<split>.txt``, or with ``data.split: auto`` drawn by a hash of
each image id) or one COCO annotation file and image folder per split
(``data.format: coco``, :mod:`stages.data.coco_in`). Every split's images are
listed, their annotations parsed, their image files fully decoded and their
boxes checked. Problems are collected over the whole dataset first; with
``data.on_error: raise`` the stage then stops before writing anything and lists
every problem, with ``skip`` it drops the bad items, counts them, prints them
and records them in the output. Later stages read only the index files, never
the annotations, so they all see the same validated images, whatever the format.

Output per split: ``features_cache/index/<split>.h5`` (see :mod:`stages.core.store`):
``image_ids``, ``paths`` (relative to ``data_root``), ``widths``, ``heights``
``(n,)``; rows ``gt_boxes (K, 4) float32``, ``gt_labels (K,) int32``,
``gt_difficult (K,) bool``; attributes ``classes``, ``data_root``, ``split``,
``problems``, ``clipped_boxes`` and the provenance. With ``data.split: auto``
also ``<split>.txt``: the ids drawn for the split, one a line, in the format of
``ImageSets/Main/<split>.txt`` (copy them there to pin the split).
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
from tqdm import tqdm

from stages.core.atomic import write_text
from stages.core.config import DataParams, as_dict
from stages.core.provenance import code_version, files_digest
from stages.core.store import RowSpec, create_per_image
from stages.data import coco_in
from stages.data.voc import (
    DataError,
    Entry,
    ImageRecord,
    Problems,
    auto_split,
    build_record,
    discover_classes,
    read_annotations,
    read_split_ids,
    voc_entries,
)

ROWS = {
    "gt_boxes": RowSpec((4,), np.float32),
    "gt_labels": RowSpec((), np.int32),
    "gt_difficult": RowSpec((), bool),
}
IMAGES = {"paths": str, "widths": np.int32, "heights": np.int32}
T = TypeVar("T")


@dataclass(frozen=True)
class Dataset:
    """What a reader found, before validation."""

    entries: dict[str, list[Entry]]  # split -> its images, in order
    split_files: dict[str, list[str]]  # split -> the files defining it, relative to the root (provenance)
    classes: tuple[str, ...]  # the classes the annotations name, used unless data.classes is given
    drawn: dict[str, list[str]] = field(default_factory=dict)  # data.split auto: split -> the ids drawn for it


def run(data: DataParams, out_dir: Path, num_workers: int = 0) -> None:
    """Validate the dataset at ``data.root`` and write one index file per split into ``out_dir``."""
    root = Path(data.root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found (data.root in params.yaml)")
    problems = Problems(data.on_error)
    dataset = (_read_coco if data.format == "coco" else _read_voc)(root, data, problems)
    classes = data.classes or dataset.classes
    if not classes:
        raise DataError(f"{root}: no object classes found in the annotations and none given in data.classes")
    records = {
        split: _build_records(root, entries, classes, problems, num_workers)
        for split, entries in dataset.entries.items()
    }
    problems.raise_if_strict()
    _report(problems)
    for split, ids in dataset.drawn.items():
        write_text(out_dir / f"{split}.txt", "".join(f"{i}\n" for i in ids))
    for split, split_records in records.items():
        used = dataset.split_files[split] + [p for entry, r in split_records for p in (*entry.files, r.path)]
        _write(out_dir / f"{split}.h5", data, root, split, [r for _, r in split_records], classes, problems, used)


def _read_voc(root: Path, data: DataParams, problems: Problems) -> Dataset:
    """A VOC folder: the ids of each split, their XML and the image files."""
    if data.split == "auto":
        ids = auto_split(root, data.splits, data.test_fraction, data.split_seed)
    else:
        listed = {split: read_split_ids(root, split, problems) for split in dict.fromkeys(data.splits)}
        ids = _drop_shared(listed, lambda i: i, root / "ImageSets" / "Main", problems)
    annotations = read_annotations(root, sorted({i for split_ids in ids.values() for i in split_ids}), problems)
    return Dataset(
        entries={split: voc_entries(root, split_ids, annotations, problems) for split, split_ids in ids.items()},
        split_files={split: [] if data.split == "auto" else [f"ImageSets/Main/{split}.txt"] for split in ids},
        classes=discover_classes(list(annotations.values())),
        drawn=ids if data.split == "auto" else {},
    )


def _read_coco(root: Path, data: DataParams, problems: Problems) -> Dataset:
    """One COCO annotation file and image folder per split; the classes are the train file's, then the test's."""
    read = {split: coco_in.read_split(root, annotations, images, problems)
            for split, (annotations, images) in data.coco_files.items()}
    entries = {split: split_entries for split, (split_entries, _) in read.items()}
    return Dataset(
        entries=_drop_shared(entries, lambda e: e.image_id, root / data.coco_test_annotations, problems),
        split_files={split: [data.coco_files[split][0]] for split in read},
        classes=tuple(dict.fromkeys(name for _, classes in read.values() for name in classes)),
    )


def _drop_shared(splits: dict[str, list[T]], image_id: Callable[[T], str], where: Path, problems: Problems
                 ) -> dict[str, list[T]]:
    """An image in both splits is a problem (train/test leakage): reported, and left out of the test split."""
    if len(splits) != 2:
        return splits
    (train, train_items), (test, test_items) = splits.items()
    shared = {image_id(i) for i in train_items} & {image_id(i) for i in test_items}
    for name in sorted(shared):
        problems.add(where, f"image {name!r} is in both {train} and {test}")
    return {train: train_items, test: [i for i in test_items if image_id(i) not in shared]}


def _build_records(
    root: Path, entries: list[Entry], classes: tuple[str, ...], problems: Problems, num_workers: int
) -> list[tuple[Entry, ImageRecord]]:
    """The entries that validate, each with its record."""
    workers = num_workers or os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:  # decoding releases the GIL
        records = list(
            tqdm(
                pool.map(lambda e: build_record(root, e, classes, problems), entries),
                total=len(entries),
                desc="index: validating images",
                unit="img",
            )
        )
    return [(e, r) for e, r in zip(entries, records) if r is not None]


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
    used: list[str],
) -> None:
    """One split's index file; ``used``: every file it was read from, relative to the root (its digest is recorded)."""
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
