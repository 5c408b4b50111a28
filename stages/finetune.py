"""Stage ``finetune``: fine-tune an ImageNet backbone for detection on warped regions (R-CNN step 2).

Training windows are every selective-search proposal of the training split
(all shards) plus every ground-truth box of its index, difficult ones included.
A window is foreground for class ``c`` (label ``c + 1``) when its best IoU over
the image's ground truth is at least ``fg_iou`` and that best box is of class
``c``; otherwise it is background (label 0): ``N + 1`` classes. Each
mini-batch holds ``round(batch_size * positive_fraction)`` foreground windows
and the rest background, drawn uniformly over all images' windows (with
replacement only when there are fewer such windows than the batch needs).
Each window is dilated to ``padding`` pixels of context, warped
anisotropically to ``input_size`` with the backbone's mean colour outside the
image (:func:`stages.ops.warp.warp_regions`), mirrored with probability 1/2 if
``mirror``, and normalised with the backbone's mean and std.

The backbone (``build_backbone(arch, weights)``) gets a fresh ``N + 1``-way
classifier, its batch norms frozen with their ImageNet statistics and folded
into the convs (:func:`stages.models.batch_norms.fold_batch_norms`: mini-batches
of windows, three quarters background, are not what the statistics should
describe; README, "R-CNN's fine-tuning"), and is trained with cross-entropy by
the training engine
(:func:`stages.core.engine.train`: SGD with momentum and weight decay, a step
learning rate, the weights written averaged over the last ``average_last`` of
the steps, autocast on CUDA, float32 on the CPU, checkpoints every
``checkpoint_every`` iterations from which a rerun resumes to the same bytes).

Data loading: batch ``b`` is fully described by ``(seed, b)`` (its windows and
mirror flags come from a generator seeded with both), so the loss curve does
not depend on the number or scheduling of loader workers, and a resumed run
sees the batches an uninterrupted one would. Loader workers decode each image
on demand, once per batch however many of its windows the batch holds, with a
small LRU cache; only the window table (boxes, image numbers, labels; shared
with spawned workers through torch's shared memory) is held for the whole
split, never the images.

Outputs: the model file (``torch.save`` of a dict: ``arch``, ``classes``,
``num_classes``, ``input_size``, ``padding``, ``mean``, ``std``,
``state_dict``, plus ``params``, ``code_version`` and ``inputs`` digests for
provenance), read back with :func:`load_model`; and the engine's training
curve CSV ``iteration,loss,accuracy``.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from stages.core.config import FinetuneParams, as_dict
from stages.core.engine import Checkpointing, Schedule, train, write_torch
from stages.core.layout import checkpoint_file, index_file, proposals_dir
from stages.core.provenance import code_version, file_digest
from stages.core.store import PerImageReader, shard_path
from stages.data.images import load_image
from stages.models.backbones import build_backbone
from stages.models.batch_norms import fold_batch_norms
from stages.ops.boxes import as_boxes, box_iou
from stages.ops.sampling import assign_labels, sample_batch
from stages.ops.warp import to_tensor_batch, warp_regions

IMAGE_CACHE = 8  # decoded images kept per loader worker


# --- windows -------------------------------------------------------------------------------------


@dataclass
class Windows:
    """The training windows of a split: ``boxes (M, 4) float32``, ``images (M,) int32``, ``labels (M,) int64``.

    ``images`` numbers into ``paths`` (absolute image files). Held as torch
    tensors so that DataLoader workers map them from shared memory.
    """

    paths: list[str]
    boxes: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor

    @property
    def foreground(self) -> np.ndarray:
        return np.flatnonzero(self.labels.numpy() > 0)

    @property
    def background(self) -> np.ndarray:
        return np.flatnonzero(self.labels.numpy() == 0)


def collect_windows(index: PerImageReader, proposals: PerImageReader, fg_iou: float) -> Windows:
    """Every proposal and every ground-truth box of every image of ``index``, labelled by their best ground truth."""
    proposals.require_images_of(index)
    root = Path(index.attrs["data_root"])
    paths, boxes, images, labels = [], [], [], []
    for i in range(len(index)):
        gt_boxes, gt_labels = index.rows("gt_boxes", i), index.rows("gt_labels", i)
        windows = np.concatenate([as_boxes(proposals.rows("boxes", i)), as_boxes(gt_boxes)])
        paths.append(str(root / index.value("paths", i)))
        boxes.append(windows)
        images.append(np.full(len(windows), i, dtype=np.int32))
        labels.append(assign_labels(box_iou(windows, gt_boxes), gt_labels, fg_iou))
    return Windows(
        paths,
        torch.from_numpy(np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)),
        torch.from_numpy(np.concatenate(images) if images else np.zeros(0, np.int32)),
        torch.from_numpy(np.concatenate(labels) if labels else np.zeros(0, np.int64)),
    )


# --- sampling ------------------------------------------------------------------------------------


def batch_plan(params: FinetuneParams, foreground: np.ndarray, background: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows and mirror flags of mini-batch number ``batch``: a function of ``params.seed`` and ``batch`` only."""
    rng = np.random.default_rng([params.seed, batch])
    chosen = sample_batch(rng, foreground, background, params.batch_size, params.positive_fraction)
    mirror = rng.random(len(chosen)) < 0.5 if params.mirror else np.zeros(len(chosen), dtype=bool)
    return chosen, mirror


class WindowBatches(Dataset):
    """``dataset[b]`` is mini-batch ``b``: ``(N, 3, S, S)`` float32 normalised regions and ``(N,)`` int64 labels."""

    def __init__(
        self, windows: Windows, params: FinetuneParams, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.windows = windows
        self.params = params
        self.mean, self.std = tuple(mean), tuple(std)
        self.fill = tuple(255 * m for m in mean)
        # tensors, not arrays: spawned workers map them from shared memory instead of each holding a copy
        self.foreground = torch.from_numpy(windows.foreground)
        self.background = torch.from_numpy(windows.background)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def image(self, i: int) -> np.ndarray:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        image = load_image(self.windows.paths[i])
        self._cache[i] = image
        if len(self._cache) > IMAGE_CACHE:
            self._cache.popitem(last=False)
        return image

    def __getitem__(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, mirror = batch_plan(self.params, self.foreground.numpy(), self.background.numpy(), batch)
        size = self.params.input_size
        regions = np.empty((len(chosen), size, size, 3), dtype=np.uint8)
        images = self.windows.images.numpy()[chosen]
        boxes = self.windows.boxes.numpy()[chosen]
        for i in np.unique(images):  # one decode per image, however many of its windows the batch holds
            rows = np.flatnonzero(images == i)
            regions[rows] = warp_regions(self.image(int(i)), boxes[rows], size, self.params.padding, self.fill, mirror[rows])
        labels = self.windows.labels[torch.from_numpy(chosen)]
        return to_tensor_batch(regions, self.mean, self.std), labels


def run(
    params: FinetuneParams,
    train_split: str,
    num_shards: int,
    model_path: Path,
    curve_path: Path,
    num_workers: int = 0,
    checkpoint_every: int = 20,
    checkpoint_path: Path = checkpoint_file("finetune"),
) -> None:
    """Fine-tune on the windows of ``train_split`` (its index and ``num_shards`` proposal shards); write the model and curve.

    Checkpoints every ``checkpoint_every`` iterations (0 = never) to ``checkpoint_path``, and resumes from it.
    """
    index_path = index_file(train_split)
    with PerImageReader([index_path]) as index, PerImageReader.sharded(proposals_dir(train_split), num_shards) as proposals:
        classes = [str(c) for c in index.json_attr("classes")]
        windows = collect_windows(index, proposals, params.fg_iou)
    num_fg, num_bg = len(windows.foreground), len(windows.background)
    print(f"finetune {train_split}: {len(windows.paths)} images, {num_fg} foreground and {num_bg} background windows, "
          f"{len(classes) + 1} classes", flush=True)
    batch_plan(params, windows.foreground, windows.background, 0)  # fail now, not in a worker, if batches are impossible
    provenance = {
        "params": as_dict(params),
        "code_version": code_version("finetune"),
        "inputs": {
            "index": file_digest(index_path),
            **{f"proposals/{k}": file_digest(shard_path(proposals_dir(train_split), k)) for k in range(num_shards)},
        },
    }

    torch.manual_seed(params.seed)
    model = build_backbone(params.arch, params.weights)
    model.replace_classifier(len(classes) + 1)
    fold_batch_norms(model)
    model_file = {
        "arch": params.arch,
        "classes": classes,
        "num_classes": len(classes) + 1,
        "input_size": params.input_size,
        "padding": params.padding,
        "mean": list(model.mean),
        "std": list(model.std),
    }
    train(
        model,
        WindowBatches(windows, params, model.mean, model.std),
        Schedule.of(params, num_fg + num_bg, params.batch_size),
        Checkpointing(checkpoint_path, checkpoint_every, provenance),
        lambda trained: write_torch(model_path, {**model_file, "state_dict": trained.state_dict(), **provenance}),
        curve_path,
        name=f"finetune {train_split}",
        num_workers=num_workers,
    )
