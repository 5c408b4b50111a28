"""Stage ``spp_features``: SPP-net pyramids of the pre-trained conv layers, one conv pass per image and scale.

The conv layers are ``build_backbone(finetune.arch, finetune.weights).features``
(ImageNet-trained, never fine-tuned: SPP-net fine-tunes only the fully
connected layers, stage ``spp_finetune``). For each image of proposal shard
``K`` and each ``sppnet.scales`` entry the whole image is resized (bilinear;
shorter side to the scale, longer side at most ``sppnet.max_side``,
:func:`stages.data.images.image_scales`), normalised with the backbone's mean and std
and run through the conv layers once. Each box is pooled at one scale, the one
where its area is closest to 224 x 224 (:func:`stages.ops.spp.choose_scale`):
projected onto that conv map (:func:`stages.ops.spp.project_boxes`) and max-pooled
into the ``sppnet.levels`` pyramid (:func:`stages.spp.pyramid_pool`).

Output per shard: ``features_cache/spp/<split>/shard-K.h5``, a feature shard
(:mod:`stages.data.featureset`) covering exactly the images of proposal shard ``K``
in the same order, with rows ``boxes``, ``gt_label``, ``iou`` (ground-truth
rows on the training split only) and ``pool (M, C * sum(l * l))`` in
``features.precision``, gzip level ``features.compression``; per-image
``widths``, ``heights``; attributes ``classes``, ``split``, ``shard_index``,
``num_shards``, ``recipe`` (``sppnet``), ``levels``, ``scales``, ``stride``,
``pool_dim`` and the provenance. ``shard-K.timing.json`` holds the wall-clock
figures (kept out of the HDF5 file so that it stays byte-identical).

Memory: one image at a time (its resized copies, one conv map, the pyramid
sparse table of that map, its pooled rows), plus up to ``num_workers`` images
decoded and resized ahead by a thread pool (decoding and resizing release the
GIL, so threads overlap them with the network without the seconds a spawned
process needs to import torch). On CUDA the conv layers run under autocast
(bfloat16 or float16).
"""
from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stages.core import runs
from stages.core.config import SPP_PYRAMID_KEYS, FeatureParams, FinetuneParams, SppParams
from stages.core.device import autocast, pick_device
from stages.core.layout import index_file, proposals_shard
from stages.core.provenance import code_version, file_digest
from stages.core.store import PerImageReader, create_per_image
from stages.data.featureset import IMAGE_DATASETS, feature_row, image_regions, region_rows
from stages.data.images import prefetch, scaled_images
from stages.models.backbones import Backbone, build_backbone
from stages.ops.spp import choose_scale, project_boxes, pyramid_dim, pyramid_pool

RECIPE = "sppnet"


def conv_map(model: Backbone, image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``(h, w, 3)`` uint8 RGB image -> ``(C, H, W)`` conv map at the backbone's stride (autocast dtype on CUDA)."""
    mean = torch.tensor(model.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(model.std, device=device).view(1, 3, 1, 1) * 255
    x = image.to(device, non_blocking=True).permute(2, 0, 1)[None].float().sub_(mean).div_(std)
    with autocast(device):
        return model.features(x.contiguous(memory_format=torch.channels_last))[0]


def image_pyramids(
    model: Backbone, resized: list[torch.Tensor], boxes: np.ndarray, factors: list[float],
    levels: tuple[int, ...], precision: str, device: torch.device,
) -> np.ndarray:
    """``(M, 4)`` boxes of one image -> ``(M, pool_dim)`` pyramids, each at its chosen scale, ``precision`` dtype.

    ``resized[s]`` is the image resized by ``factors[s]``.
    """
    scale = choose_scale(boxes, factors)
    pooled = np.empty((len(boxes), pyramid_dim(model.feature_channels, levels)), dtype=np.dtype(precision))
    for s, (image, factor) in enumerate(zip(resized, factors)):
        rows = np.flatnonzero(scale == s)
        if len(rows) == 0:
            continue
        features = conv_map(model, image, device).to(getattr(torch, precision))  # max commutes with the (monotonic) cast
        cells = project_boxes(boxes[rows], factor, model.stride, features.shape[1], features.shape[2])
        pooled[rows] = pyramid_pool(features, cells, levels).cpu().numpy()
    return pooled


def _attrs(
    params: SppParams, features: FeatureParams, finetune: FinetuneParams, model: Backbone, classes: list[str],
    inputs: dict[str, Path], split: str, shard: int, num_shards: int, train_split: str,
) -> dict:
    weights = Path(finetune.weights)
    return {
        "stage": "spp_features",
        "classes": classes,
        "split": split,
        "shard_index": shard,
        "num_shards": num_shards,
        "recipe": RECIPE,
        "levels": list(params.levels),
        "scales": list(params.scales),
        "stride": model.stride,
        "pool_dim": pyramid_dim(model.feature_channels, params.levels),
        "params": {
            **{f"sppnet.{k}": getattr(params, k) for k in SPP_PYRAMID_KEYS},
            "features.precision": features.precision,
            "features.compression": features.compression,
            "finetune.arch": finetune.arch,
            "finetune.weights": finetune.weights,
            "data.train_split": train_split,
        },
        "code_version": code_version("spp_features"),
        "inputs": {
            **{name: file_digest(path) for name, path in inputs.items()},
            **({"weights": file_digest(weights)} if weights.is_file() else {}),
        },
    }


def run(
    params: SppParams,
    features: FeatureParams,
    finetune: FinetuneParams,
    split: str,
    shard: int,
    num_shards: int,
    train_split: str,
    out_path: Path,
    num_workers: int = 0,
) -> None:
    """Write the SPP pyramids of proposal shard ``shard`` of ``split`` (plus ground truth on ``train_split``)."""
    index_path = index_file(split)
    with PerImageReader([index_path]) as index, PerImageReader([proposals_shard(split, shard)]) as proposals:
        proposals.check_shards(num_shards, [shard])
        classes = [str(c) for c in index.json_attr("classes")]
        positions = [index.position(image_id) for image_id in proposals.image_ids]
        model = build_backbone(finetune.arch, finetune.weights)
        device = pick_device()
        model.to(device, memory_format=torch.channels_last).eval()
        attrs = _attrs(params, features, finetune, model, classes, {"index": index_path, "proposals": proposals.paths[0]},
                       split, shard, num_shards, train_split)
        rows = {**region_rows(len(classes)),
                "pool": feature_row(attrs["pool_dim"], features.precision, features.compression)}
        root = Path(index.attrs["data_root"])
        decode = partial(scaled_images, scales=params.scales, max_side=params.max_side, pin=device.type == "cuda")
        loader = prefetch(decode, [str(root / index.value("paths", i)) for i in positions],
                          max(1, num_workers or os.cpu_count() or 1))
        wall, regions = time.perf_counter(), 0
        with torch.inference_mode(), create_per_image(out_path, rows, attrs, IMAGE_DATASETS) as writer:
            progress = tqdm(zip(positions, loader), total=len(positions), desc=f"spp_features {split} shard {shard}",
                            unit="img")
            for k, (i, (resized, factors)) in enumerate(progress):
                width, height = int(index.value("widths", i)), int(index.value("heights", i))
                found = image_regions(proposals.rows("boxes", k), index.rows("gt_boxes", i),
                                      index.rows("gt_labels", i), len(classes), with_gt=split == train_split)
                pool = image_pyramids(model, resized, found["boxes"], factors, params.levels, features.precision,
                                      device)
                writer.append(index.image_ids[i], {**found, "pool": pool}, widths=width, heights=height)
                regions += len(pool)
        seconds = time.perf_counter() - wall
    timing = {"images": len(positions), "regions": regions, "wall_seconds": seconds,
              "seconds_per_image": seconds / max(1, len(positions))}
    runs.record(out_path, timing)
