"""Stage ``rpn_train`` (entries ``rpn_train_1`` and ``rpn_train_4``): train Faster R-CNN's region proposal network.

The RPN steps of the four-step alternating training (Ren et al., NIPS 2015):

* step 1 (``rpn_train_1`` -> ``m1``): the RPN and the conv trunk from ImageNet
  (``finetune.arch`` and ``finetune.weights``; the trunk's first
  ``fast_rcnn.learn_from`` modules frozen, as the detector's);
* step 4 (``rpn_train_4``, ``init_path`` = step 3's detector ``m2`` -> ``m3``):
  a new RPN on ``m2``'s conv trunk, which stays frozen, as ``m2``'s detector
  layers do; ``m3`` carries them on to step 5.

The network is :class:`stages.models.fast_rcnn.FasterRcnn` and the loss
torchvision's :class:`~torchvision.models.detection.rpn.RegionProposalNetwork`:
anchors matched at ``faster_rcnn.fg_iou`` / ``bg_iou`` (each ground truth's
best anchors foreground too), ``anchors_per_image`` sampled, binary
cross-entropy on the objectness and smooth L1 on the foreground's box deltas.
Mini-batches are Fast R-CNN's (:class:`stages.fast_rcnn_train.RoiBatches`:
``fast_rcnn.images_per_batch`` images, mirrored and resized as the detector's,
seeded by ``fast_rcnn.seed``) with the ground-truth boxes, difficult ones
included, as their only candidates, padded to multiples of the stride. The SGD
schedule is the step's (``faster_rcnn.step1``, ``step4``). A step computes the
losses alone, no proposals (:meth:`FasterRcnn.rpn_losses`). The curve's
``accuracy`` column is the objectness' balanced accuracy over the labelled
anchors: the mean of the foreground's and the background's recall.

Output: the model file (:func:`stages.models.fast_rcnn.model_file` with the
anchors, ``state_dict`` and provenance), read by
:func:`stages.models.fast_rcnn.load_fast_rcnn`, and the loss curve CSV.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stages.core.config import (RPN_FAST_RCNN_KEYS, RPN_KEYS, FasterRcnnParams, FastRcnnParams, FinetuneParams,
                                as_dict)
from stages.core.engine import Checkpointing, Schedule, train, write_torch
from stages.core.layout import checkpoint_file, index_file
from stages.core.provenance import code_version, file_digest
from stages.core.store import ArtifactError, PerImageReader
from stages.fast_rcnn_train import RoiBatches, TrainingImage, collect_images
from stages.models.fast_rcnn import FasterRcnn, build_model, model_file, set_learning


def ground_truth_images(train_split: str, fg_iou: float) -> tuple[list[str], list[TrainingImage]]:
    """The classes and every image of ``train_split`` with its ground-truth boxes as its candidates."""
    with PerImageReader([index_file(train_split)]) as index:
        return [str(c) for c in index.json_attr("classes")], collect_images(index, None, fg_iou)


def batch_ground_truth(batch: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
    """Per image of a :class:`RoiBatches` batch of ground-truth candidates: its ``(G, 4)`` boxes in resized pixels
    and ``(G,)`` labels (class ``c`` as ``c + 1``)."""
    image = batch["rois"][:, 0].long()
    chosen = [image == k for k in range(len(batch["images"]))]
    return [batch["rois"][rows, 1:] for rows in chosen], [batch["labels"][rows] for rows in chosen]


def rpn_step(params: FasterRcnnParams):
    """The engine's step: the RPN loss (objectness plus box regression) of a batch and the objectness' balanced
    accuracy over its labelled anchors (:meth:`FasterRcnn.rpn_losses`: no proposals drawn)."""
    def step(model: FasterRcnn, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        images, (gt_boxes, _) = batch["images"], batch_ground_truth(batch)
        losses, accuracy = model.rpn_losses(images, model.conv(images), batch["sizes"].tolist(), params, gt_boxes)
        return losses["loss_objectness"] + losses["loss_rpn_box_reg"], accuracy

    return step


def new_network(classes: list[str], params: FasterRcnnParams, fast_rcnn: FastRcnnParams,
                finetune: FinetuneParams) -> FasterRcnn:
    """A Faster R-CNN network of the params: the conv trunk of ``finetune.weights``, new RPN and detector layers
    (drawn from torch's generator)."""
    return FasterRcnn(finetune.arch, len(classes), fast_rcnn.pooling, fast_rcnn.pool_size, fast_rcnn.hidden,
                      fast_rcnn.dropout, fast_rcnn.learn_from, fast_rcnn.target_means, fast_rcnn.target_stds,
                      weights=finetune.weights, anchor_sizes=params.anchor_sizes, aspect_ratios=params.aspect_ratios)


def training_inputs(train_split: str, finetune: FinetuneParams, init_path: Path | None = None) -> dict[str, str]:
    """The digests of what an RPN training reads: the index, a weights file, the model it starts from."""
    return {
        "index": file_digest(index_file(train_split)),
        **({"weights": file_digest(Path(finetune.weights))} if Path(finetune.weights).is_file() else {}),
        **({"init": file_digest(init_path)} if init_path else {}),
    }


def with_new_rpn(init_path: Path, params: FasterRcnnParams, classes: list[str]) -> FasterRcnn:
    """The detector of ``init_path`` with a new RPN of ``params``' anchors (random initialisation)."""
    saved = torch.load(init_path, map_location="cpu", weights_only=True)
    if saved["classes"] != classes:
        raise ArtifactError(f"{init_path}: trained for classes {saved['classes']}, not the index's {classes}")
    model = build_model({**saved, "anchor_sizes": params.anchor_sizes, "aspect_ratios": params.aspect_ratios})
    missing, unexpected = model.load_state_dict(saved["state_dict"], strict=False)
    if unexpected or any(not key.startswith("rpn_head.") for key in missing):
        raise ArtifactError(f"{init_path}: not a Fast R-CNN detector of this pipeline (unexpected {unexpected}, "
                            f"missing {missing})")
    return model


def run(
    step: int,
    params: FasterRcnnParams,
    fast_rcnn: FastRcnnParams,
    finetune: FinetuneParams,
    train_split: str,
    model_path: Path,
    curve_path: Path,
    init_path: Path | None = None,
    num_workers: int = 0,
    checkpoint_every: int = 20,
) -> None:
    """Alternating step ``step`` (1 or 4, the module docstring): train an RPN on ``train_split``; write model, curve."""
    schedule = getattr(params, f"step{step}")
    classes, images = ground_truth_images(train_split, fast_rcnn.fg_iou)
    print(f"rpn_train step {step} {train_split}: {len(images)} images, "
          f"{sum(len(i.rois.boxes) for i in images)} ground-truth boxes", flush=True)
    provenance = {
        "params": {"faster_rcnn": {**{k: v for k, v in as_dict(params).items() if k in RPN_KEYS},
                                   f"step{step}": as_dict(schedule)},
                   "fast_rcnn": {k: v for k, v in as_dict(fast_rcnn).items() if k in RPN_FAST_RCNN_KEYS},
                   "finetune.arch": finetune.arch, "finetune.weights": finetune.weights,
                   "data.train_split": train_split},
        "code_version": code_version("rpn_train"),
        "inputs": training_inputs(train_split, finetune, init_path),
    }
    torch.manual_seed(fast_rcnn.seed)
    if init_path:
        model, learn_from = with_new_rpn(init_path, params, classes), None
    else:
        model, learn_from = new_network(classes, params, fast_rcnn, finetune), fast_rcnn.learn_from
    set_learning(model, learn_from, detector=False, rpn=True)
    saved = {**model_file(model, classes, len(model.trunk) if learn_from is None else learn_from),
             "scales": list(fast_rcnn.scales), "max_side": fast_rcnn.max_side}
    train(
        model,
        RoiBatches(images, fast_rcnn, every_roi=True, pad=model.pad_value, size_multiple=model.stride),
        Schedule.of(schedule, len(images), fast_rcnn.images_per_batch),
        Checkpointing(checkpoint_file(f"rpn_train_{step}"), checkpoint_every, provenance),
        lambda trained: write_torch(model_path, {**saved, "state_dict": trained.state_dict(), **provenance}),
        curve_path,
        name=f"rpn_train step {step}",
        num_workers=num_workers,
        step=rpn_step(params),
        describe=lambda batch: f"; images {', '.join(batch['image_ids'])}",
    )
