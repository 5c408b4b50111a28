"""Stage ``spp_finetune``: train SPP-net's fully connected layers on the cached pyramids.

SPP-net fine-tunes only the layers after the pyramid: here a fresh MLP
``fc6 = Linear(pool_dim, hidden) + ReLU + Dropout``, ``fc7`` (the same,
``hidden -> hidden``) and ``fc8 = Linear(hidden, C + 1)`` (N(0, 0.01), as
R-CNN's), trained with cross-entropy by the training engine
(:func:`stages.core.engine.train`: SGD with momentum and weight decay, a step
learning rate, checkpoints every ``checkpoint_every`` iterations from which a
rerun resumes to the same bytes) on the pyramids of the training split
(``features_cache/spp/<split>/``, all shards) - no image is read.

Labels: a ground-truth row is its class + 1; a proposal is ``c + 1`` for the
class ``c`` of its largest per-class IoU (``iou`` rows) if that IoU is at
least ``fg_iou``, else 0 (background): ``C + 1`` classes.

Mini-batches are Fast R-CNN's hierarchical sampling: batch ``b`` draws
``images_per_batch`` distinct images (among those with at least one row), then
``batch_size`` of their rows, ``round(batch_size * positive_fraction)``
foreground and the rest background, each part without replacement unless it
has fewer rows than it needs (all background if the images hold no
foreground, all foreground if no background). Only those images' rows are
read, so memory is bounded by the batch, not the split. Batch ``b`` is a
function of ``(seed, b)`` only; ``num_workers`` loader workers read and
decompress them ahead of the training loop, and the result does not depend on
their number.

Features are cast to float32 and multiplied by ``feature_scale``, set once so
that the mean L2 norm over the rows of a seeded sample of :data:`NORM_IMAGES`
images is ``sqrt(pool_dim)`` (unit root-mean-square per dimension): the
learning rate then does not depend on the backbone's feature magnitude
(:func:`stages.data.featureset.feature_scale`).

Outputs: the head file (``torch.save`` of a dict: ``classes``, ``num_classes``,
``pool_dim``, ``hidden``, ``dropout``, ``levels``, ``feature_scale``,
``state_dict``, ``params``, ``code_version``, ``inputs``), read back with
:func:`load_head`; and the engine's training curve CSV ``iteration,loss,accuracy``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from stages.core.config import SppParams, as_dict
from stages.core.engine import Checkpointing, Schedule, train, write_torch
from stages.core.errors import PipelineError
from stages.core.layout import checkpoint_file, spp_dir
from stages.core.provenance import code_version, file_digest
from stages.core.store import PerImageReader
from stages.data.featureset import feature_scale
from stages.models.spp_head import SppHead
from stages.ops.sampling import assign_labels, sample_batch

NORM_IMAGES = 16  # images whose rows estimate the mean feature norm


class SppFinetuneError(PipelineError, ValueError):
    """The cached pyramids cannot make the requested mini-batches, or a head file is unusable."""


def region_labels(gt_label: np.ndarray, iou: np.ndarray, fg_iou: float) -> np.ndarray:
    """``(M,)`` gt_label rows, ``(M, C)`` per-class IoU rows -> ``(M,)`` int64 labels, 0 = background.

    Ties between classes go to the lower class number.
    """
    gt_label = np.asarray(gt_label, dtype=np.int64)
    proposal = assign_labels(iou, np.arange(iou.shape[1]), fg_iou)
    return np.where(gt_label >= 0, gt_label + 1, proposal)


def sample_regions(rng: np.random.Generator, labels: np.ndarray, batch_size: int, positive_fraction: float) -> np.ndarray:
    """``(batch_size,)`` row numbers of ``labels``: foreground first, then background (see the module docstring)."""
    foreground, background = np.flatnonzero(labels > 0), np.flatnonzero(labels == 0)
    fraction = positive_fraction if len(foreground) and len(background) else float(len(foreground) > 0)
    return sample_batch(rng, foreground, background, batch_size, fraction)


class RegionBatches(Dataset):
    """``dataset[b]`` is mini-batch ``b``: ``(batch_size, pool_dim)`` cached pyramids and ``(batch_size,)`` labels."""

    def __init__(self, folder: Path, num_shards: int, images: np.ndarray, params: SppParams) -> None:
        self.folder, self.num_shards, self.params = folder, num_shards, params
        self.images = torch.from_numpy(images)  # shared memory with spawned workers
        self._reader: PerImageReader | None = None  # opened in each worker: h5py files do not pickle

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None}

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    @property
    def reader(self) -> PerImageReader:
        if self._reader is None:
            self._reader = PerImageReader.sharded(self.folder, self.num_shards)
        return self._reader

    def __getitem__(self, batch: int) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng([self.params.seed, batch])
        images = self.images.numpy()
        chosen = np.sort(rng.choice(images, size=min(self.params.images_per_batch, len(images)), replace=False))
        labels = np.concatenate([
            region_labels(self.reader.rows("gt_label", i), self.reader.rows("iou", i), self.params.fg_iou)
            for i in chosen
        ])
        rows = sample_regions(rng, labels, self.params.batch_size, self.params.positive_fraction)
        pool = np.concatenate([self.reader.rows("pool", i) for i in chosen])[rows]
        return torch.from_numpy(pool.astype(np.float32)), torch.from_numpy(labels[rows])


def count_labels(reader: PerImageReader, fg_iou: float) -> np.ndarray:
    """``(n, 2)`` foreground and background rows of every image (reads only the small region rows)."""
    counts = np.zeros((len(reader), 2), dtype=np.int64)
    for i in range(len(reader)):
        labels = region_labels(reader.rows("gt_label", i), reader.rows("iou", i), fg_iou)
        counts[i] = (labels > 0).sum(), (labels == 0).sum()
    return counts


def run(params: SppParams, train_split: str, num_shards: int, head_path: Path, curve_path: Path,
        num_workers: int = 0, checkpoint_every: int = 20,
        checkpoint_path: Path = checkpoint_file("spp_finetune")) -> None:
    """Train the fc layers on the cached pyramids of ``train_split`` (``num_shards`` shards); write head and curve.

    Checkpoints every ``checkpoint_every`` iterations (0 = never) to ``checkpoint_path``, and resumes from it.
    """
    folder = spp_dir(train_split)
    with PerImageReader.sharded(folder, num_shards) as reader:
        classes = [str(c) for c in reader.json_attr("classes")]
        pool_dim, levels = int(reader.attrs["pool_dim"]), reader.json_attr("levels")
        counts = count_labels(reader, params.fg_iou)
        images = np.flatnonzero(counts.sum(axis=1) > 0)
        print(f"spp_finetune {train_split}: {len(images)} images, {counts[:, 0].sum()} foreground and "
              f"{counts[:, 1].sum()} background regions, {len(classes) + 1} classes", flush=True)
        if params.positive_fraction > 0 and counts[:, 0].sum() == 0:
            raise SppFinetuneError(f"{folder}: no foreground regions (sppnet.fg_iou, or the split's ground truth)")
        if len(images) == 0:
            raise SppFinetuneError(f"{folder}: no regions to train on")
        scale = feature_scale(reader, "pool", math.sqrt(pool_dim), params.seed, max_images=NORM_IMAGES).scale
        inputs = {f"spp/{k}": file_digest(path) for k, path in enumerate(reader.paths)}

    head_file = {
        "classes": classes,
        "num_classes": len(classes) + 1,
        "pool_dim": pool_dim,
        "hidden": params.hidden,
        "dropout": params.dropout,
        "levels": list(levels),
        "feature_scale": scale,
    }
    provenance = {"params": as_dict(params), "code_version": code_version("spp_finetune"), "inputs": inputs}
    torch.manual_seed(params.seed)
    head = SppHead(pool_dim, params.hidden, len(classes) + 1, params.dropout, scale)
    batches = RegionBatches(folder, num_shards, images, params)
    try:
        train(
            head,
            batches,
            Schedule.of(params, len(images), params.images_per_batch),
            Checkpointing(checkpoint_path, checkpoint_every, provenance),
            lambda trained: write_torch(head_path, {**head_file, "state_dict": trained.state_dict(), **provenance}),
            curve_path,
            name=f"spp_finetune {train_split}",
            num_workers=num_workers,
        )
    finally:
        batches.close()
