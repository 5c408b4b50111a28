"""Stage ``faster_rcnn_joint``: Faster R-CNN by approximate joint training, one network in one stage.

The alternative the paper gives to its four alternating steps: the RPN and the
detector share the conv trunk and train together, the loss of a mini-batch
being the RPN loss plus the detector's multi-task loss on RoIs sampled from the
RPN's own proposals, which count as constants (no gradient flows through their
coordinates: torchvision detaches them). "Approximate" because the exact
gradient would also flow through the proposal boxes.

Mini-batches are those of ``rpn_train`` (ground-truth boxes as candidates,
:class:`stages.fast_rcnn_train.RoiBatches`); per image the RPN's
``faster_rcnn.train_proposals`` proposals (after NMS at ``nms_iou``) and its
ground-truth boxes are labelled at ``fast_rcnn.fg_iou`` and sampled as
``fast_rcnn_train`` samples them (``rois_per_image``, ``positive_fraction``,
``bg_iou_low``; the draw a function of ``fast_rcnn.seed`` and the batch
number). Schedule, which conv layers learn, and the detector's layers are the
``fast_rcnn`` section's; the RPN's the ``faster_rcnn`` section's. The curve's
``accuracy`` is the detector's RoI accuracy.

Output: a model file like the alternating training's final one, for
``faster_rcnn_detect`` (recipe ``faster_rcnn_joint``), and the loss curve.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stages.core.config import RPN_KEYS, FasterRcnnParams, FastRcnnParams, FinetuneParams, as_dict
from stages.core.engine import Checkpointing, Schedule, train, write_torch
from stages.core.layout import checkpoint_file
from stages.core.provenance import code_version
from stages.fast_rcnn_train import RoiBatches, detector_loss
from stages.models.fast_rcnn import FasterRcnn, model_file, set_learning
from stages.ops.roi import image_rois, regression_targets, sample_rois
from stages.rpn_train import batch_ground_truth, ground_truth_images, new_network, training_inputs


def sampled_rois(rng: np.random.Generator, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor],
                 params: FastRcnnParams) -> dict[str, Tensor]:
    """Fast R-CNN's hierarchical sample of each image's proposals and ground truth (labels ``c + 1``): ``rois (R, 5)``,
    ``labels (R,)`` and normalised ``targets (R, 4)``, on the proposals' device."""
    rois, labels, targets = [], [], []
    for k, (boxes, gt, gt_label) in enumerate(zip(proposals, gt_boxes, gt_labels)):
        candidates = image_rois(boxes.detach().cpu().numpy(), gt.cpu().numpy(), gt_label.cpu().numpy() - 1,
                                params.fg_iou)
        chosen = candidates.take(sample_rois(rng, candidates, params.rois_per_image, params.positive_fraction,
                                             params.bg_iou_low))
        rois.append(np.concatenate([np.full((len(chosen.boxes), 1), k, np.float32), chosen.boxes], axis=1))
        labels.append(chosen.labels)
        targets.append(regression_targets(chosen, params.target_means, params.target_stds))
    device = proposals[0].device
    return {"rois": torch.from_numpy(np.concatenate(rois)).to(device),
            "labels": torch.from_numpy(np.concatenate(labels)).to(device),
            "targets": torch.from_numpy(np.concatenate(targets)).to(device)}


def joint_step(params: FasterRcnnParams, fast_rcnn: FastRcnnParams):
    """The engine's step: the RPN loss plus the detector's loss on RoIs sampled from the RPN's proposals."""
    def step(model: FasterRcnn, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        images, (gt_boxes, gt_labels) = batch["images"], batch_ground_truth(batch)
        conv = model.conv(images)
        proposals, losses = model.propose(images, conv, batch["sizes"].tolist(), params, True, gt_boxes)
        rng = np.random.default_rng([fast_rcnn.seed, int(batch["batch"])])
        detector, accuracy = detector_loss(model, conv, sampled_rois(rng, proposals, gt_boxes, gt_labels, fast_rcnn),
                                           fast_rcnn)
        return losses["loss_objectness"] + losses["loss_rpn_box_reg"] + detector, accuracy

    return step


def run(
    params: FasterRcnnParams,
    fast_rcnn: FastRcnnParams,
    finetune: FinetuneParams,
    train_split: str,
    model_path: Path,
    curve_path: Path,
    num_workers: int = 0,
    checkpoint_every: int = 20,
) -> None:
    """Train Faster R-CNN jointly on ``train_split``; write the model and its curve."""
    classes, images = ground_truth_images(train_split, fast_rcnn.fg_iou)
    print(f"faster_rcnn_joint {train_split}: {len(images)} images, "
          f"{sum(len(i.rois.boxes) for i in images)} ground-truth boxes", flush=True)
    provenance = {
        "params": {"faster_rcnn": {k: v for k, v in as_dict(params).items() if k in RPN_KEYS},
                   "fast_rcnn": {k: v for k, v in as_dict(fast_rcnn).items() if k in fast_rcnn.training_keys()},
                   "finetune.arch": finetune.arch, "finetune.weights": finetune.weights,
                   "data.train_split": train_split},
        "code_version": code_version("faster_rcnn_joint"),
        "inputs": training_inputs(train_split, finetune),
    }
    torch.manual_seed(fast_rcnn.seed)
    model = new_network(classes, params, fast_rcnn, finetune)
    set_learning(model, fast_rcnn.learn_from, detector=True, rpn=True)
    saved = {**model_file(model, classes, fast_rcnn.learn_from), "sampler": "heuristic",
             "scales": list(fast_rcnn.scales), "max_side": fast_rcnn.max_side}
    train(
        model,
        RoiBatches(images, fast_rcnn, every_roi=True, pad=model.pad_value, size_multiple=model.stride),
        Schedule.of(fast_rcnn, len(images), fast_rcnn.images_per_batch),
        Checkpointing(checkpoint_file("faster_rcnn_joint"), checkpoint_every, provenance),
        lambda trained: write_torch(model_path, {**saved, "state_dict": trained.state_dict(), **provenance}),
        curve_path,
        name="faster_rcnn_joint",
        num_workers=num_workers,
        step=joint_step(params, fast_rcnn),
        describe=lambda batch: f"; images {', '.join(batch['image_ids'])}",
    )
