"""Stage ``fast_rcnn_train``: train Fast R-CNN on the training split's selective-search proposals.

One network trained in one stage (Girshick, ICCV 2015): the conv layers of
``finetune.arch`` with ``finetune.weights`` (ImageNet), RoI pooling of each
proposal from the stride-16 conv map of the whole image, fc6 and fc7, then an
``N + 1``-way softmax and class-specific box deltas
(:class:`stages.models.fast_rcnn.FastRcnn`), trained with the multi-task loss
(:func:`stages.ops.roi.roi_losses`) by the training engine
(:func:`stages.core.engine.train`: SGD, step learning rate with warm-up,
autocast on CUDA, checkpoints and resume, loss curve).

Candidates of an image: its proposals (all shards) and its ground-truth boxes,
difficult ones included, each labelled by its best ground truth at
``fg_iou`` (:func:`stages.ops.roi.image_rois`), with regression targets
normalised by ``target_means`` and ``target_stds``. Mini-batch ``b`` is a
function of ``(seed, b)`` only: ``images_per_batch`` images drawn without
replacement, each mirrored with probability 1/2 (``mirror``) and resized so its
shorter side is one of ``scales`` (drawn) and its longer at most ``max_side``.
The recipe picks the RoIs:

* ``fast_rcnn`` (hierarchical sampling): ``rois_per_image`` per image,
  ``positive_fraction`` foreground, background with IoU in ``[bg_iou_low, fg_iou)``
  (:func:`stages.ops.roi.sample_rois`);
* ``fast_rcnn_ohem`` (online hard example mining, Shrivastava et al., CVPR
  2016): every candidate of the batch's images goes through the RoI head
  without gradient, ``roi_chunk`` at a time; per image the ``ohem_rois``
  highest-loss RoIs that survive NMS at ``ohem_nms`` in loss order
  (:func:`stages.ops.roi.ohem_select`) are the mini-batch of the forward and
  backward pass. No foreground fraction; background from IoU 0.

The same stage trains the detectors of Faster R-CNN's alternating training
(stages ``fast_rcnn_train_2`` and ``fast_rcnn_train_4``, hierarchical sampling):
the candidates are then an RPN's proposals (``proposals``), and with
``init_path`` the network starts from that model file (step 5: the step-4
model, whose conv trunk and RPN stay frozen: only the fc layers and outputs
learn).

Output: the model file (``torch.save`` of a dict: :func:`stages.models.fast_rcnn.model_file`,
``state_dict``, ``sampler``, ``scales``, ``max_side`` and the provenance:
``params``, ``code_version``, ``inputs``), read by :func:`stages.models.fast_rcnn.load_fast_rcnn`;
and the loss curve CSV ``iteration,loss,accuracy``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from stages.core.config import SAMPLERS, FastRcnnParams, FinetuneParams, as_dict
from stages.core.engine import Checkpointing, Schedule, train, write_torch
from stages.core.layout import checkpoint_file, index_file
from stages.core.provenance import code_version, file_digest
from stages.core.store import ArtifactError, PerImageReader, shard_path
from stages.data.images import image_scales, load_image, resize
from stages.models.fast_rcnn import FastRcnn, build_model, evaluating, model_file, set_learning
from stages.ops.boxes import hflip_boxes
from stages.ops.roi import ImageRois, image_rois, ohem_select, regression_targets, roi_losses, sample_rois


@dataclass(frozen=True)
class TrainingImage:
    path: str
    rois: ImageRois


def collect_images(index: PerImageReader, proposals: PerImageReader | None, fg_iou: float) -> list[TrainingImage]:
    """Every image of ``index`` with its labelled candidate RoIs (its ground-truth boxes only when ``proposals``
    is ``None``)."""
    if proposals is not None:
        proposals.require_images_of(index)
    root = Path(index.attrs["data_root"])
    none = np.zeros((0, 4), np.float32)
    return [TrainingImage(str(root / index.value("paths", i)),
                          image_rois(none if proposals is None else proposals.rows("boxes", i),
                                     index.rows("gt_boxes", i), index.rows("gt_labels", i), fg_iou))
            for i in range(len(index))]


def mirrored(rois: ImageRois, width: int) -> ImageRois:
    return ImageRois(hflip_boxes(rois.boxes, width), rois.labels, rois.max_iou, hflip_boxes(rois.gt, width))


class RoiBatches(Dataset):
    """``dataset[b]`` is mini-batch ``b``: a dict of ``images (B, H, W, 3)`` uint8 (padded with ``pad`` to
    multiples of ``size_multiple``), ``sizes (B, 2)`` (each resized image's height and width), ``rois (R, 5)``
    (image, box in resized pixels), ``labels (R,)``, ``targets (R, 4)``, ``image_ids`` and ``batch`` (``b``).

    ``every_roi``: every candidate of the batch's images (OHEM, and the RPN stages, whose candidates are the
    ground truth), else the hierarchical sample."""

    def __init__(self, images: list[TrainingImage], params: FastRcnnParams, every_roi: bool, pad: tuple[int, int, int],
                 size_multiple: int = 1):
        self.images, self.params, self.every_roi, self.pad = images, params, every_roi, pad
        self.size_multiple = size_multiple

    def plan(self, batch: int) -> list[tuple[int, bool, int, np.ndarray]]:
        """``(image, mirror, scale, RoI rows)`` of each image of mini-batch ``batch``."""
        p = self.params
        rng = np.random.default_rng([p.seed, batch])
        chosen = rng.choice(len(self.images), min(p.images_per_batch, len(self.images)), replace=False)
        plan = []
        for i in chosen:
            mirror = bool(p.mirror and rng.random() < 0.5)
            scale = int(p.scales[rng.integers(len(p.scales))])
            rois = self.images[i].rois
            rows = (np.arange(len(rois.boxes)) if self.every_roi
                    else sample_rois(rng, rois, p.rois_per_image, p.positive_fraction, p.bg_iou_low))
            plan.append((int(i), mirror, scale, rows))
        return plan

    def __getitem__(self, batch: int) -> dict[str, Any]:
        p = self.params
        pixels, rois, labels, targets, names = [], [], [], [], []
        for k, (i, mirror, scale, rows) in enumerate(self.plan(batch)):
            image, chosen = load_image(self.images[i].path), self.images[i].rois.take(rows)
            height, width = image.shape[:2]
            if mirror:
                image, chosen = np.ascontiguousarray(image[:, ::-1]), mirrored(chosen, width)
            factor = image_scales(width, height, [scale], p.max_side)[0]
            pixels.append(resize(image, factor))
            rois.append(np.concatenate([np.full((len(rows), 1), k, np.float32), chosen.boxes * factor], axis=1))
            labels.append(chosen.labels)
            targets.append(regression_targets(chosen, p.target_means, p.target_stds))
            names.append(Path(self.images[i].path).name)
        return {"images": torch.from_numpy(pad_batch(pixels, self.pad, self.size_multiple)),
                "sizes": torch.tensor([p.shape[:2] for p in pixels], dtype=torch.int64),
                "rois": torch.from_numpy(np.concatenate(rois)), "labels": torch.from_numpy(np.concatenate(labels)),
                "targets": torch.from_numpy(np.concatenate(targets)), "image_ids": names, "batch": batch}


def pad_batch(images: list[np.ndarray], pad: tuple[int, int, int], multiple: int = 1) -> np.ndarray:
    """``(H_i, W_i, 3)`` uint8 images -> ``(B, H, W, 3)``, each at the top left, the rest ``pad``; ``H`` and ``W``
    are the largest height and width rounded up to multiples of ``multiple``."""
    height, width = (-(-max(i.shape[k] for i in images) // multiple) * multiple for k in (0, 1))
    batch = np.empty((len(images), height, width, 3), np.uint8)
    batch[:] = np.asarray(pad, np.uint8)
    for k, image in enumerate(images):
        batch[k, :image.shape[0], :image.shape[1]] = image
    return batch


def detector_loss(model: FastRcnn, conv: torch.Tensor, batch: dict[str, Any], params: FastRcnnParams
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean multi-task loss and the accuracy of a batch's ``rois``, ``labels`` and ``targets`` on ``conv``
    (a zero loss and accuracy 1 for a batch without RoIs)."""
    logits, deltas = model.heads(conv, batch["rois"])
    if len(logits) == 0:
        return logits.sum(), torch.tensor(1.0)
    losses = roi_losses(logits, deltas, batch["labels"], batch["targets"], params.loss_lambda)
    return losses.mean(), (logits.argmax(1) == batch["labels"]).float().mean()


def heuristic_step(params: FastRcnnParams):
    """The engine's step for hierarchically sampled mini-batches: the mean multi-task loss of their RoIs."""
    def step(model: FastRcnn, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return detector_loss(model, model.conv(batch["images"]), batch, params)

    return step


def ohem_step(params: FastRcnnParams):
    """The engine's step for OHEM: score every RoI read-only, keep the hardest, train on those."""
    def step(model: FastRcnn, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        conv = model.conv(batch["images"])
        rois, labels, targets = batch["rois"], batch["labels"], batch["targets"]
        with torch.no_grad(), evaluating(model.fc):
            losses = torch.cat([
                roi_losses(*model.heads(conv, rois[s:s + params.roi_chunk]), labels[s:s + params.roi_chunk],
                           targets[s:s + params.roi_chunk], params.loss_lambda)
                for s in range(0, len(rois), params.roi_chunk)])
        hard = ohem_select(losses, rois[:, 1:], rois[:, 0].long(), params.ohem_rois, params.ohem_nms)
        logits, deltas = model.heads(conv, rois[hard])
        loss = roi_losses(logits, deltas, labels[hard], targets[hard], params.loss_lambda).mean()
        return loss, (logits.argmax(1) == labels[hard]).float().mean()

    return step


def initialised(init_path: Path, model: FastRcnn, classes: list[str]) -> FastRcnn:
    """The model of ``init_path``, whose layers must be those of ``model`` (the params'), with its trunk and RPN
    frozen: only the detector's fc layers and outputs learn (Faster R-CNN step 5)."""
    saved = torch.load(init_path, map_location="cpu", weights_only=True)
    if saved["classes"] != classes:
        raise ArtifactError(f"{init_path}: trained for classes {saved['classes']}, not the index's {classes}")
    initial = build_model({**model_file(model, classes, 0), **{k: saved[k] for k in ("anchor_sizes", "aspect_ratios")
                                                               if k in saved}})
    try:
        initial.load_state_dict(saved["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{init_path}: its layers do not fit the fast_rcnn params ({exc})") from None
    set_learning(initial, None, detector=True)
    return initial


def run(
    recipe: str,
    params: FastRcnnParams,
    finetune: FinetuneParams,
    train_split: str,
    num_shards: int,
    proposals: Path,
    model_path: Path,
    curve_path: Path,
    init_path: Path | None = None,
    num_workers: int = 0,
    checkpoint_every: int = 20,
) -> None:
    """Train Fast R-CNN model ``recipe`` (its sampler: :data:`SAMPLERS`) on ``train_split`` and the proposal shards
    in folder ``proposals``, from ImageNet or from ``init_path`` (frozen trunk and RPN); write model and curve."""
    sampler = SAMPLERS[recipe]
    index_path = index_file(train_split)
    with PerImageReader([index_path]) as index, PerImageReader.sharded(proposals, num_shards) as shards:
        classes = [str(c) for c in index.json_attr("classes")]
        images = collect_images(index, shards, params.fg_iou)
    foreground = sum(int((i.rois.labels > 0).sum()) for i in images)
    print(f"fast_rcnn_train {recipe} ({sampler} sampling) {train_split}: {len(images)} images, "
          f"{sum(len(i.rois.boxes) for i in images)} candidate RoIs, {foreground} foreground", flush=True)
    provenance = {
        "params": {"fast_rcnn": {k: v for k, v in as_dict(params).items() if k in params.training_keys()},
                   "finetune.arch": finetune.arch, "finetune.weights": finetune.weights,
                   "data.train_split": train_split},
        "code_version": code_version("fast_rcnn_train"),
        "inputs": {
            "index": file_digest(index_path),
            **{f"proposals/{k}": file_digest(shard_path(proposals, k)) for k in range(num_shards)},
            **({"weights": file_digest(Path(finetune.weights))} if Path(finetune.weights).is_file() else {}),
            **({"init": file_digest(init_path)} if init_path else {}),
        },
    }
    torch.manual_seed(params.seed)
    model = FastRcnn(finetune.arch, len(classes), params.pooling, params.pool_size, params.hidden, params.dropout,
                     params.learn_from, params.target_means, params.target_stds, weights=finetune.weights)
    learn_from = params.learn_from
    if init_path:
        model, learn_from = initialised(init_path, model, classes), len(model.trunk)
    saved = {**model_file(model, classes, learn_from), "sampler": sampler, "scales": list(params.scales),
             "max_side": params.max_side}
    train(
        model,
        RoiBatches(images, params, every_roi=sampler == "ohem", pad=model.pad_value),
        Schedule.of(params, len(images), params.images_per_batch),
        Checkpointing(checkpoint_file(f"fast_rcnn_train@{recipe}"), checkpoint_every, provenance),
        lambda trained: write_torch(model_path, {**saved, "state_dict": trained.state_dict(), **provenance}),
        curve_path,
        name=f"fast_rcnn_train {recipe}",
        num_workers=num_workers,
        step=ohem_step(params) if sampler == "ohem" else heuristic_step(params),
        describe=lambda batch: f"; images {', '.join(batch['image_ids'])}",
    )
