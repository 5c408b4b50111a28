"""Fast R-CNN's network: what ``fast_rcnn_train`` trains and ``fast_rcnn_detect`` reads.

::

    image --trunk--> conv map (stride 16) --RoI pooling--> p x p x C --fc6, fc7--> cls_score (K + 1 softmax)
                                                                            \\-> bbox_pred (4 (K + 1) deltas)

``trunk`` is the registry backbone's ``features`` (:mod:`stages.models.backbones`)
with its batch norms frozen (two images per mini-batch are too few for batch
statistics, as in torchvision's detectors) and folded into the convs before
them (:func:`stages.models.batch_norms.fold_batch_norms`); its first
``learn_from`` modules do not learn. RoI pooling is
:func:`torchvision.ops.roi_pool` (max over bins, the paper's) or
:func:`torchvision.ops.roi_align`. fc6 and fc7 are new layers of ``hidden``
units with dropout: EfficientNet-Lite0 and ResNet have no pre-trained hidden
fc layers to reuse, and two thin fc layers keep the per-RoI cost far below a
conv pass (what makes test time fast). The box deltas are trained on
normalised targets; :meth:`FastRcnn.detect` un-normalises them.

Test time (``fast_rcnn_detect``, and ``fast_rcnn_recache``, which caches the
same pass's features for post-hoc SVMs) decodes each image resized for one
conv pass (:func:`resized_images`), runs :func:`conv_pass`, and feeds the
image's boxes as :func:`image_rois` through the head.

:class:`FasterRcnn` adds a region proposal network on the same conv map
(Ren et al., NIPS 2015), built of torchvision's parts: ``rpn_head`` (3x3 conv,
then one objectness logit and four deltas per anchor: :class:`RPNHead`) and
``anchor_generator`` (:class:`AnchorGenerator`), which
:meth:`FasterRcnn.proposal_network` assembles into torchvision's
:class:`RegionProposalNetwork` (anchor matching, sampling, loss, NMS; its NMS
first over a prefix of the ranking: :class:`PrefixNmsRpn`).
"""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import roi_align, roi_pool

from stages.core.config import FasterRcnnParams
from stages.core.device import autocast
from stages.core.store import ArtifactError
from stages.data.images import prefetch, scaled_images
from stages.models.backbones import build_backbone
from stages.models.batch_norms import bake_folded_weights, fold_batch_norms
from stages.ops.boxes import as_boxes
from stages.ops.svd import truncated_svd

FC6, FC7 = 0, 3  # positions of the two linear layers in FastRcnn.fc


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode (no dropout) for the block, then restore its mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class FastRcnn(nn.Module):
    """The network of the module docstring; ``arch`` from the backbone registry, ``num_classes`` without background."""

    def __init__(
        self, arch: str, num_classes: int, pooling: str, pool_size: int, hidden: int, dropout: float,
        learn_from: int, target_means: Sequence[float], target_stds: Sequence[float], weights: str = "random",
    ) -> None:
        super().__init__()
        backbone = build_backbone(arch, weights)
        self.arch, self.num_classes, self.pooling, self.pool_size = arch, num_classes, pooling, pool_size
        self.hidden_units, self.dropout = hidden, dropout
        self.stride, self.channels = backbone.stride, backbone.feature_channels
        self.trunk = fold_batch_norms(backbone.features)
        for module in list(self.trunk.children())[:learn_from]:
            module.requires_grad_(False)
        self.register_buffer("pixel_mean", torch.tensor(backbone.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("pixel_std", torch.tensor(backbone.std).view(1, 3, 1, 1) * 255)
        self.register_buffer("target_means", torch.tensor(target_means, dtype=torch.float32))
        self.register_buffer("target_stds", torch.tensor(target_stds, dtype=torch.float32))
        self.fc = nn.Sequential(
            nn.Linear(backbone.feature_channels * pool_size * pool_size, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        )
        self.cls_score = nn.Linear(hidden, num_classes + 1)
        self.bbox_pred = nn.Linear(hidden, 4 * (num_classes + 1))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    @property
    def pad_value(self) -> tuple[int, int, int]:
        """The uint8 colour that normalises to (about) zero: what pads a mini-batch of unequal images."""
        return tuple(int(round(v)) for v in self.pixel_mean.flatten().tolist())

    def conv(self, images: Tensor) -> Tensor:
        """``(B, H, W, 3)`` uint8 RGB images -> ``(B, C, ceil(H / 16), ceil(W / 16))`` conv maps."""
        x = images.permute(0, 3, 1, 2).float().sub_(self.pixel_mean).div_(self.pixel_std)
        return self.trunk(x)

    def pool(self, conv: Tensor, rois: Tensor) -> Tensor:
        """``(R, 5)`` RoIs ``image, x1, y1, x2, y2`` (continuous pixels of the conv input) -> ``(R, C * p * p)``.

        :func:`roi_pool` takes inclusive pixel corners (the reference
        implementation's), so ``x2, y2`` are passed as ``x2 - 1, y2 - 1``;
        :func:`roi_align` (``aligned=True``) takes continuous ones. Both pool in
        float32: under autocast the map may be bfloat16, whose 8-bit mantissa
        would round RoI corners near 500 px to 4 px.
        """
        conv, rois = conv.float(), rois.float()
        if self.pooling == "roi_align":
            pooled = roi_align(conv, rois, self.pool_size, 1 / self.stride, sampling_ratio=2, aligned=True)
        else:
            inclusive = torch.cat([rois[:, :3], rois[:, 3:] - 1], dim=1)
            pooled = roi_pool(conv, inclusive, self.pool_size, 1 / self.stride)
        return pooled.flatten(1)

    def heads(self, conv: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
        """``(R, K + 1)`` class logits and ``(R, K + 1, 4)`` normalised box deltas of ``(R, 5)`` RoIs on ``conv``."""
        features = self.fc(self.pool(conv, rois))
        return self.cls_score(features), self.bbox_pred(features).view(len(rois), self.num_classes + 1, 4)

    def region_features(self, conv: Tensor, rois: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(R, C * p * p)`` RoI-pooled features, ``(R, hidden)`` fc7 after its ReLU and ``(R, K + 1)`` float32
        softmax probabilities of ``(R, 5)`` RoIs on ``conv`` (eval mode: no dropout)."""
        pooled = self.pool(conv, rois)
        hidden = self.fc(pooled)
        return pooled, hidden, torch.softmax(self.cls_score(hidden).float(), dim=1)

    def detect(self, conv: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
        """``(R, K + 1)`` float32 softmax probabilities and ``(R, K + 1, 4)`` un-normalised deltas (eval mode)."""
        logits, deltas = self.heads(conv, rois)
        return torch.softmax(logits.float(), dim=1), deltas.float() * self.target_stds + self.target_means

    def compressed(self, ranks: Sequence[int]) -> "FastRcnn":
        """A copy with fc6 and fc7 replaced by their truncated SVDs of ``ranks`` (:func:`truncated_svd`)."""
        copied = copy.deepcopy(self)
        for position, rank in zip((FC6, FC7), ranks):
            copied.fc[position] = truncated_svd(self.fc[position], rank)
        return copied.eval()


class PrefixNmsRpn(RegionProposalNetwork):
    """torchvision's :class:`RegionProposalNetwork` whose proposal NMS first looks at the best few boxes only.

    Greedy NMS keeps a box unless a better-scored kept box overlaps it, so the
    boxes kept among the ``k`` best of a ranking are the first of those kept
    among all of it. When the best ``PREFIX_FACTOR x post_nms`` boxes already
    leave ``post_nms`` after NMS, they are the proposals NMS over all
    ``pre_nms`` boxes gives (the paper's 12000 in training; boxes of equal
    score may come in another order), for a fraction of the NMS, whose cost
    grows with the square of the boxes; otherwise NMS runs over all of them.
    Only for one feature map (ours): with several, torchvision ranks each map's
    boxes apart, and the full NMS always runs."""

    PREFIX_FACTOR = 3

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: list[tuple[int, int]],
                         num_anchors_per_level: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        full, wanted = self._pre_nms_top_n, self.post_nms_top_n()
        prefix = self.PREFIX_FACTOR * wanted
        if len(num_anchors_per_level) == 1 and prefix < min(self.pre_nms_top_n(), num_anchors_per_level[0]):
            self._pre_nms_top_n = {mode: prefix for mode in full}
            try:
                boxes, scores = super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
            finally:
                self._pre_nms_top_n = full
            if all(len(kept) == wanted for kept in boxes):
                return boxes, scores
        return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)


class FasterRcnn(FastRcnn):
    """:class:`FastRcnn` with a region proposal network on its conv map: anchors of ``anchor_sizes`` x
    ``aspect_ratios`` (height / width) pixels of the conv input at every cell."""

    def __init__(self, *args, anchor_sizes: Sequence[int], aspect_ratios: Sequence[float], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.anchor_sizes, self.aspect_ratios = tuple(anchor_sizes), tuple(float(r) for r in aspect_ratios)
        self.anchor_generator = AnchorGenerator((self.anchor_sizes,), (self.aspect_ratios,))
        self.rpn_head = RPNHead(self.channels, len(self.anchor_sizes) * len(self.aspect_ratios))

    def proposal_network(self, params: FasterRcnnParams, training: bool) -> RegionProposalNetwork:
        """torchvision's RPN over this model's head and anchors, with ``params``' matching, sampling and NMS and
        its training or test proposal counts (:meth:`FasterRcnnParams.proposal_counts`); in training mode when
        ``self`` is (it then needs targets and returns losses)."""
        pre_nms, post_nms = params.proposal_counts(training)
        rpn = PrefixNmsRpn(
            self.anchor_generator, self.rpn_head, params.fg_iou, params.bg_iou, params.anchors_per_image,
            params.positive_fraction, {"training": pre_nms, "testing": pre_nms},
            {"training": post_nms, "testing": post_nms}, params.nms_iou)
        rpn.min_size = params.min_size
        return rpn.train(self.training)

    def propose(self, images: Tensor, conv: Tensor, sizes: Sequence[tuple[int, int]], params: FasterRcnnParams,
                training: bool, gt_boxes: Sequence[Tensor] | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals ``(P_i, 4)`` of each image of a ``(B, H, W, 3)`` batch (``H``, ``W`` multiples of the stride,
        :func:`pad_to_stride`) from its conv map, in resized-image pixels, best first and clipped to its
        ``(height, width)``; with ``gt_boxes`` (one ``(G_i, 4)`` per image, training mode) also the RPN losses
        ``loss_objectness`` and ``loss_rpn_box_reg``. The proposals carry no gradient (torchvision detaches them)."""
        targets = None if gt_boxes is None else [{"boxes": boxes.float()} for boxes in gt_boxes]
        return self.proposal_network(params, training)(self.image_list(images, sizes), {"0": conv.float()}, targets)

    def rpn_losses(self, images: Tensor, conv: Tensor, sizes: Sequence[tuple[int, int]], params: FasterRcnnParams,
                   gt_boxes: Sequence[Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """The RPN losses of :meth:`propose` in training mode, ``loss_objectness`` and ``loss_rpn_box_reg``,
        without the proposals: torchvision's :meth:`RegionProposalNetwork.forward` less its ``filter_proposals``
        (top-N, NMS), which an RPN training step does not use and which cost about a quarter of one on a CPU.
        Also the objectness' balanced accuracy over the labelled anchors (the mean of the foreground's and the
        background's recall at logit 0; 1 for a side without anchors)."""
        rpn, features = self.proposal_network(params, training=True), [conv.float()]
        objectness, deltas = concat_box_prediction_layers(*rpn.head(features))
        anchors = rpn.anchor_generator(self.image_list(images, sizes), features)
        labels, matched = rpn.assign_targets_to_anchors(anchors, [{"boxes": boxes.float()} for boxes in gt_boxes])
        loss_objectness, loss_box = rpn.compute_loss(objectness, deltas, labels, rpn.box_coder.encode(matched, anchors))
        labels, positive = torch.cat(labels), objectness.detach().flatten() > 0
        recalls = [(positive[labels == side] == bool(side)).float().mean() if (labels == side).any()
                   else torch.tensor(1.0) for side in (0, 1)]
        return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}, torch.stack(recalls).mean()

    def image_list(self, images: Tensor, sizes: Sequence[tuple[int, int]]) -> ImageList:
        """torchvision's view of a ``(B, H, W, 3)`` batch padded to multiples of the stride (:func:`pad_to_stride`)
        and its images' ``(height, width)``: the image tensor only gives the anchors their stride (padded size /
        map size), a view, no copy."""
        if images.shape[1] % self.stride or images.shape[2] % self.stride:
            raise ValueError(f"images of {tuple(images.shape[1:3])} pixels: pad them to multiples of {self.stride}")
        return ImageList(images.permute(0, 3, 1, 2), [tuple(int(v) for v in s) for s in sizes])


def set_learning(model: FastRcnn, trunk_from: int | None, detector: bool, rpn: bool = False) -> None:
    """Which parts of ``model`` learn: the conv trunk's modules from ``trunk_from`` on (``None``: none), the
    detector's fc layers and outputs, and a :class:`FasterRcnn`'s RPN head."""
    for k, module in enumerate(model.trunk.children()):
        module.requires_grad_(trunk_from is not None and k >= trunk_from)
    for part in (model.fc, model.cls_score, model.bbox_pred):
        part.requires_grad_(detector)
    if isinstance(model, FasterRcnn):
        model.rpn_head.requires_grad_(rpn)


def pad_to_stride(images: Tensor, stride: int, pad: Sequence[int]) -> Tensor:
    """``(B, H, W, 3)`` uint8 images padded at the bottom and right with colour ``pad`` to multiples of ``stride``:
    the conv map then covers exactly ``stride`` pixels per cell, as the anchors assume."""
    height, width = (-(-side // stride) * stride for side in images.shape[1:3])
    if (height, width) == tuple(images.shape[1:3]):
        return images
    padded = torch.empty((len(images), height, width, 3), dtype=images.dtype, device=images.device)
    padded[:] = torch.tensor(pad, dtype=images.dtype, device=images.device)
    padded[:, :images.shape[1], :images.shape[2]] = images
    return padded


# --- test time: one conv pass of the whole image -------------------------------------------------


def resized_images(
    paths: list[str], scale: int, max_side: int, device: torch.device, num_workers: int
) -> Iterator[tuple[Tensor, float]]:
    """Each of ``paths`` decoded and resized for the conv pass (:func:`stages.data.images.scaled_images`: shorter
    side ``scale``, longer at most ``max_side``; pinned on CUDA) with its factor, decoded ahead: on CUDA by
    ``num_workers`` threads (0 = one per core), on the CPU by one, as the conv pass there already takes every core
    (two decoding threads made it 13% slower on 2 cores)."""
    decode = partial(scaled_images, scales=[scale], max_side=max_side, pin=device.type == "cuda")
    threads = max(1, num_workers or os.cpu_count() or 1) if device.type == "cuda" else 1
    for (image,), (factor,) in prefetch(decode, paths, threads):
        yield image, factor


def conv_pass(model: FastRcnn, image: Tensor, device: torch.device) -> Tensor:
    """``(h, w, 3)`` uint8 image -> its ``(1, C, H, W)`` conv map on ``device`` (autocast dtype on CUDA)."""
    with autocast(device):
        return model.conv(image.to(device, non_blocking=True)[None])


def propose_image(model: FasterRcnn, image: Tensor, params: FasterRcnnParams, training_counts: bool,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """One ``(h, w, 3)`` uint8 resized image -> its ``(1, C, H, W)`` conv map and ``(P, 4)`` float32 RPN proposals
    in its pixels, best first (eval mode; the training or test proposal counts). One conv pass serves both the
    proposals and the detector's RoIs."""
    images = pad_to_stride(image.to(device, non_blocking=True)[None], model.stride, model.pad_value)
    with autocast(device):
        conv = model.conv(images)
    (boxes,), _ = model.propose(images, conv, [tuple(image.shape[:2])], params, training_counts)
    return conv, boxes.float()


def image_rois(boxes: np.ndarray, factor: float) -> Tensor:
    """``(M, 4)`` boxes in image pixels -> ``(M, 5)`` float32 RoIs ``0, x1, y1, x2, y2`` of the image resized by
    ``factor`` (the only image of its conv map)."""
    boxes = as_boxes(boxes)
    return torch.from_numpy(np.concatenate([np.zeros((len(boxes), 1), np.float32), boxes * factor], 1))


def model_file(model: FastRcnn, classes: list[str], learn_from: int) -> dict:
    """What a Fast (or Faster) R-CNN model file holds besides its state dict and provenance: enough to rebuild it."""
    described = {
        "arch": model.arch, "classes": classes, "num_classes": model.num_classes, "pooling": model.pooling,
        "pool_size": model.pool_size, "hidden": model.hidden_units, "dropout": model.dropout,
        "learn_from": learn_from, "target_means": model.target_means.tolist(),
        "target_stds": model.target_stds.tolist(),
    }
    if isinstance(model, FasterRcnn):
        described.update(anchor_sizes=list(model.anchor_sizes), aspect_ratios=list(model.aspect_ratios))
    return described


def build_model(described: dict, weights: str = "random") -> FastRcnn:
    """The network :func:`model_file` describes (a :class:`FasterRcnn` if it has anchors), initialised with the
    backbone's ``weights`` and torch's random draws."""
    args = (described["arch"], described["num_classes"], described["pooling"], described["pool_size"],
            described["hidden"], described["dropout"], described["learn_from"], described["target_means"],
            described["target_stds"])
    if "anchor_sizes" in described:
        return FasterRcnn(*args, weights=weights, anchor_sizes=described["anchor_sizes"],
                          aspect_ratios=described["aspect_ratios"])
    return FastRcnn(*args, weights=weights)


def load_fast_rcnn(path: str | Path, baked: bool = False) -> FastRcnn:
    """The model saved by ``fast_rcnn_train`` (or a Faster R-CNN stage: then a :class:`FasterRcnn`), on the CPU in
    eval mode, with ``classes`` set; ``baked``: for test time, its conv weights computed once
    (:func:`bake_folded_weights`)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: Fast R-CNN model not found (run the stage that trains it first: "
                            "fast_rcnn_train, or for features_cache/faster_rcnn/ a Faster R-CNN stage)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(saved)
        model.load_state_dict(saved["state_dict"], strict=True)
    except (KeyError, RuntimeError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: not a Fast R-CNN model file of this pipeline ({exc})") from None
    model.classes = list(saved["classes"])
    if baked:
        bake_folded_weights(model.trunk)
    return model.eval()
