"""Stage ``features``: the R-CNN feature cache, every region's CNN features computed once (R-CNN step 3).

Shard ``K`` covers the images of the proposal shard ``K``, in its order. An
image's regions are its proposals in proposal order, then, on the training
split only (``data.train_split``), its ground-truth boxes, difficult ones
included (:func:`stages.data.featureset.image_regions`). Each region is dilated to
``padding`` pixels of context and warped anisotropically to ``input_size``
with the network's mean colour outside the image (:func:`stages.ops.warp.warp_regions`),
normalised, and run through the network once: ``pool`` and ``fc`` are
:meth:`Backbone.forward_features`, ``scores`` the softmax of the classifier on
``fc`` (column 0 = background).

The network (``features.model``): ``finetuned`` is the finetune stage's model
(its ``input_size``, ``padding`` and classes, which must be the index's);
``imagenet`` is ``finetune.arch`` with ``finetune.weights``, warped with
``finetune.input_size`` and ``finetune.padding``, the "no fine-tuning" ablation.
Its classifier is a fresh ``N + 1``-way layer drawn from ``finetune.seed``, so
its ``scores`` are meaningless (stored only to keep one format); use its
``pool``/``fc`` features.

Output: ``features_cache/features/rcnn/<split>/shard-K.h5`` in the feature-cache
format of :mod:`stages.data.featureset` (rows ``boxes``, ``gt_label``, ``iou``,
``pool``, ``fc``, ``scores``; per-image ``widths``, ``heights``; attributes
``classes``, ``split``, ``shard_index``, ``num_shards``, ``recipe`` = ``rcnn``,
``pool_dim``, ``fc_dim``, ``input_size``, ``padding``, ``model``, ``arch`` and
the provenance), and ``shard-K.timing.json`` (images, regions, wall seconds,
regions per second), kept apart so the HDF5 file stays byte-identical.

Work plan: the shard's regions, all images concatenated, are cut into chunks
of ``features.batch_size`` consecutive regions (a chunk can span images), so
every forward pass but the last is full and the network's memory (inputs and
activations) is bounded by the batch size however many proposals an image
has. Finished rows are buffered, in the storage dtype, until their image's
last chunk is done, then the image is written. Spawned DataLoader workers (a
fork of a process whose torch/OpenCV thread pools run can deadlock) read the
boxes, decode images on demand with a small LRU cache and warp the next
chunks while the main process runs the network on the current one.
``num_workers`` 0 means ``max(1, cpu_count() - 1)``, leaving a core to the
main process (forward pass, HDF5 compression): on this 2-core machine one
worker warps about 1,400 regions/s, 9x what the network consumes, and a
second one only doubled the start-up (two processes importing torch at once,
2.5 s to 5 s) for the same steady rate (``bench/bench_features.py``). Loader
workers never import torchvision (see :func:`region_boxes`, :func:`load_network`).

Determinism: the chunks depend only on ``batch_size``, so two runs on the
CPU give byte-identical files. Features of a region can differ in the last
bits with ``batch_size`` (the convolution kernels block the batch differently).
On CUDA the forward pass runs under autocast (bfloat16, else float16) with
pinned, non-blocking copies; outputs are cast to float32 on the CPU, then to
``features.precision``.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from stages.core import runs
from stages.core.config import FeatureParams, FinetuneParams, as_dict
from stages.core.device import autocast, pick_device
from stages.core.errors import PipelineError
from stages.core.layout import FINETUNED_MODEL, index_file, proposals_shard
from stages.core.provenance import code_version, file_digest
from stages.core.store import ArtifactError, PerImageReader, PerImageWriter, RowSpec, create_per_image
from stages.data.featureset import IMAGE_DATASETS, feature_row, image_regions, region_rows
from stages.data.images import load_image
from stages.ops.warp import to_tensor_batch, warp_regions

if TYPE_CHECKING:
    from stages.models.backbones import Backbone

IMAGE_CACHE = 4  # decoded images (and their boxes) kept per loader worker
FEATURES = ("pool", "fc", "scores")


class FeatureError(PipelineError, ValueError):
    """The network does not fit the dataset (its classes differ from the index's)."""


# --- regions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardImages:
    """The images of one proposal shard: where they are in the index, their files and region offsets.

    Image ``i`` owns regions ``offsets[i]:offsets[i + 1]`` of the shard's
    concatenated regions; ``offsets`` is ``(n + 1,)`` int64.
    """

    index_path: Path
    proposals_path: Path
    num_classes: int
    with_gt: bool
    image_ids: list[str]
    positions: list[int]  # image number in the index
    paths: list[str]  # image files
    offsets: np.ndarray

    @property
    def num_regions(self) -> int:
        return int(self.offsets[-1])


def shard_images(index: PerImageReader, proposals: PerImageReader, with_gt: bool) -> ShardImages:
    """Plan a shard from its index and proposal readers, reading only offsets, never boxes."""
    root = Path(index.attrs["data_root"])
    missing = sorted(set(proposals.image_ids) - set(index.image_ids))
    if missing:
        raise ArtifactError(f"{proposals.paths[0]}: images {missing[:3]} are not in {index.paths[0]} "
                            "(stale artifact; rerun the proposals stage)")
    positions = [index.position(image_id) for image_id in proposals.image_ids]
    counts = proposals.counts() + (index.counts()[positions] if with_gt else 0)
    return ShardImages(
        index_path=index.paths[0],
        proposals_path=proposals.paths[0],
        num_classes=len(index.json_attr("classes")),
        with_gt=with_gt,
        image_ids=list(proposals.image_ids),
        positions=positions,
        paths=[str(root / index.value("paths", j)) for j in positions],
        offsets=np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64),
    )


def read_regions(
    images: ShardImages, index: PerImageReader, proposals: PerImageReader, i: int
) -> dict[str, np.ndarray]:
    """Rows ``boxes``, ``gt_label``, ``iou`` of the shard's image ``i`` (:func:`stages.data.featureset.image_regions`)."""
    j = images.positions[i]
    return image_regions(proposals.rows("boxes", i), index.rows("gt_boxes", j), index.rows("gt_labels", j),
                         images.num_classes, images.with_gt)


def region_boxes(images: ShardImages, index: PerImageReader, proposals: PerImageReader, i: int) -> np.ndarray:
    """``(m, 4)`` the ``boxes`` rows of :func:`read_regions` alone: proposals, then the ground truth if ``with_gt``.

    What loader workers read: :func:`read_regions` would also compute the IoU
    columns, and the first IoU imports torchvision (seconds per worker start).
    """
    boxes = proposals.rows("boxes", i)
    return np.concatenate([boxes, index.rows("gt_boxes", images.positions[i])]) if images.with_gt else boxes


class RegionChunks(Dataset):
    """``dataset[k]``: ``(n, 3, S, S)`` float32 normalised, channels-last warped regions ``k*B : k*B + n``.

    Reads each image's boxes and pixels only when a chunk needs them (once per
    worker, with an LRU cache of :data:`IMAGE_CACHE` images); images without
    regions are never decoded.
    """

    def __init__(self, images: ShardImages, batch_size: int, input_size: int, padding: int,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.images = images
        self.batch_size = batch_size
        self.input_size, self.padding = input_size, padding
        self.mean, self.std = mean, std
        self.fill = tuple(255 * m for m in mean)
        self._readers: tuple[PerImageReader, PerImageReader] | None = None
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return math.ceil(self.images.num_regions / self.batch_size)

    def __getstate__(self) -> dict:
        # sent to spawned workers: open HDF5 files do not pickle, each worker opens its own
        return {**self.__dict__, "_readers": None, "_cache": OrderedDict()}

    def image(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Pixels ``(H, W, 3)`` uint8 and region boxes ``(m, 4)`` of image ``i``."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        if self._readers is None:
            self._readers = (PerImageReader([self.images.index_path]), PerImageReader([self.images.proposals_path]))
        boxes = region_boxes(self.images, *self._readers, i)
        self._cache[i] = (load_image(self.images.paths[i]), boxes)
        if len(self._cache) > IMAGE_CACHE:
            self._cache.popitem(last=False)
        return self._cache[i]

    def __getitem__(self, k: int) -> torch.Tensor:
        offsets, size = self.images.offsets, self.input_size
        start = k * self.batch_size
        stop = min(start + self.batch_size, self.images.num_regions)
        regions = np.empty((stop - start, size, size, 3), dtype=np.uint8)
        first = int(np.searchsorted(offsets, start, side="right")) - 1
        last = int(np.searchsorted(offsets, stop, side="left"))
        for i in range(first, last):
            lo, hi = max(start, offsets[i]), min(stop, offsets[i + 1])
            if hi > lo:
                image, boxes = self.image(i)
                regions[lo - start:hi - start] = warp_regions(
                    image, boxes[lo - offsets[i]:hi - offsets[i]], size, self.padding, self.fill)
        return to_tensor_batch(regions, self.mean, self.std).contiguous(memory_format=torch.channels_last)


def _init_worker(_: int) -> None:
    cv2.setNumThreads(1)
    torch.set_num_threads(1)  # parallelism comes from the worker processes


# --- network -------------------------------------------------------------------------------------


def load_network(
    params: FeatureParams, finetune: FinetuneParams, classes: list[str]
) -> tuple[Backbone, dict[str, str]]:
    """The network of ``params.model`` with ``input_size`` and ``padding`` set, and digests of the files it read."""
    # Imported here, not at the top: each spawned loader worker imports this module for RegionChunks,
    # and torchvision (imported by the model code) would add about 2 s to every worker's start.
    from stages.models.backbones import build_backbone
    from stages.models.finetuned import load_model

    if params.model == "finetuned":
        model = load_model(FINETUNED_MODEL)
        if model.classes != classes:
            raise FeatureError(f"{FINETUNED_MODEL}: fine-tuned for classes {model.classes}, but the index has "
                               f"{classes} (rerun the finetune stage on this dataset)")
        return model, {"model": file_digest(FINETUNED_MODEL)}
    torch.manual_seed(finetune.seed)
    model = build_backbone(finetune.arch, finetune.weights, num_classes=len(classes) + 1)
    model.input_size, model.padding = finetune.input_size, finetune.padding
    if finetune.weights in ("imagenet", "random"):
        return model, {}
    return model, {"weights": file_digest(finetune.weights)}


def forward(model: Backbone, x: torch.Tensor, device: torch.device, precision: str) -> dict[str, np.ndarray]:
    """``(n, 3, S, S)`` regions -> ``pool (n, Dp)``, ``fc (n, Df)`` in ``precision`` and ``scores (n, C + 1)`` float32.

    Call under :func:`torch.inference_mode` with ``model`` on ``device`` in eval mode.
    """
    x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
    with autocast(device):
        pool, fc = model.forward_features(x)
        logits = model.classifier(fc)
    scores = torch.softmax(logits.float(), dim=1)
    dtype = np.dtype(precision)
    return {
        "pool": pool.cpu().float().numpy().astype(dtype, copy=False),
        "fc": fc.cpu().float().numpy().astype(dtype, copy=False),
        "scores": scores.cpu().numpy(),
    }


# --- output --------------------------------------------------------------------------------------


class RowBuffer:
    """Feature rows computed but not yet written, in region order; :meth:`take` removes the first ones."""

    def __init__(self, empty: dict[str, np.ndarray]) -> None:
        self.empty = empty  # zero-row arrays with each dataset's columns and dtype
        self.parts: list[dict[str, np.ndarray]] = []

    def add(self, rows: dict[str, np.ndarray]) -> None:
        self.parts.append(rows)

    def take(self, count: int) -> dict[str, np.ndarray]:
        """The first ``count`` rows of every dataset."""
        taken = [self.empty]
        while count:
            part = self.parts[0]
            n = min(count, len(part["fc"]))
            taken.append({name: rows[:n] for name, rows in part.items()})
            rest = {name: rows[n:] for name, rows in part.items()}
            if len(rest["fc"]):
                self.parts[0] = rest
            else:
                self.parts.pop(0)
            count -= n
        return {name: np.concatenate([t[name] for t in taken]) for name in self.empty}


def output_rows(model: Backbone, params: FeatureParams, num_classes: int) -> dict[str, RowSpec]:
    """The row datasets of a shard: :func:`stages.data.featureset.region_rows` and the network's outputs."""
    return {
        **region_rows(num_classes),
        "pool": feature_row(model.pool_dim, params.precision, params.compression),
        "fc": feature_row(model.fc_dim, params.precision, params.compression),
        "scores": feature_row(num_classes + 1, "float32", params.compression),
    }


def default_workers(num_workers: int) -> int:
    """Loader processes: ``num_workers``, or when 0 one per core except the main process's (at least one)."""
    return num_workers if num_workers > 0 else max(1, (os.cpu_count() or 1) - 1)


def chunk_outputs(
    model: Backbone, images: ShardImages, params: FeatureParams, num_workers: int
) -> Iterator[dict[str, np.ndarray]]:
    """The :func:`forward` outputs of every chunk of the shard's regions, in order, warped by loader workers."""
    device = pick_device()
    # channels_last: 1.6x faster depthwise convolutions on the CPU, and what tensor cores want on CUDA
    model.to(device, memory_format=torch.channels_last).eval()
    chunks = RegionChunks(images, params.batch_size, model.input_size, model.padding, model.mean, model.std)
    workers = min(default_workers(num_workers), len(chunks))  # an empty shard starts no process
    loader = DataLoader(
        chunks,
        batch_size=None,  # each item is already a chunk
        shuffle=False,
        num_workers=workers,
        multiprocessing_context=multiprocessing.get_context("spawn") if workers else None,
        worker_init_fn=_init_worker if workers else None,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers else None,
    )
    with torch.inference_mode():
        for x in loader:
            yield forward(model, x, device, params.precision)


def _append_finished(writer: PerImageWriter, images: ShardImages, index: PerImageReader, proposals: PerImageReader,
                     buffer: RowBuffer, done: int) -> None:
    """Write, in order, every image whose regions all lie among the first ``done`` computed ones."""
    while len(writer.image_ids) < len(images.image_ids) and images.offsets[len(writer.image_ids) + 1] <= done:
        i = len(writer.image_ids)
        j = images.positions[i]
        features = buffer.take(int(images.offsets[i + 1] - images.offsets[i]))
        writer.append(images.image_ids[i], {**read_regions(images, index, proposals, i), **features},
                      widths=index.value("widths", j), heights=index.value("heights", j))


def run(
    params: FeatureParams,
    finetune: FinetuneParams,
    split: str,
    shard: int,
    num_shards: int,
    train_split: str,
    out_path: Path,
    num_workers: int = 0,
) -> None:
    """Cache the features of every region of proposal shard ``shard`` of ``split`` in ``out_path``."""
    wall = time.perf_counter()
    index_path, proposals_path = index_file(split), proposals_shard(split, shard)
    with PerImageReader([index_path]) as index, PerImageReader([proposals_path]) as proposals:
        proposals.check_shards(num_shards, [shard])
        classes = [str(c) for c in index.json_attr("classes")]
        images = shard_images(index, proposals, with_gt=split == train_split)
        model, model_inputs = load_network(params, finetune, classes)
        attrs = {
            "stage": "features",
            "recipe": "rcnn",
            "classes": classes,
            "split": split,
            "shard_index": shard,
            "num_shards": num_shards,
            "model": params.model,
            "arch": model.arch,
            "pool_dim": model.pool_dim,
            "fc_dim": model.fc_dim,
            "input_size": model.input_size,
            "padding": model.padding,
            "params": {"features": as_dict(params), "finetune": as_dict(finetune), "data.train_split": train_split},
            "code_version": code_version("features"),
            "inputs": {"index": file_digest(index_path), "proposals": file_digest(proposals_path), **model_inputs},
        }
        rows = output_rows(model, params, len(classes))
        buffer = RowBuffer({name: np.zeros((0, *rows[name].tail), rows[name].dtype) for name in FEATURES})
        with create_per_image(out_path, rows, attrs, IMAGE_DATASETS) as writer, \
                tqdm(total=images.num_regions, desc=f"features {split} shard {shard}", unit="region") as progress:
            done = 0
            for outputs in chunk_outputs(model, images, params, num_workers):
                buffer.add(outputs)
                done += len(outputs["fc"])
                progress.update(len(outputs["fc"]))
                _append_finished(writer, images, index, proposals, buffer, done)
            _append_finished(writer, images, index, proposals, buffer, done)  # trailing images without regions
    wall = time.perf_counter() - wall
    timing = {"images": len(images.image_ids), "regions": images.num_regions, "wall_seconds": wall,
              "regions_per_second": images.num_regions / wall}
    runs.record(out_path, timing)
