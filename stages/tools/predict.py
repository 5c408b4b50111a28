"""``python -m stages predict --recipe R IMAGE_OR_FOLDER...``: a trained recipe on images outside the dataset.

Every image goes through the recipe's whole test-time path on the fly, with
the models the pipeline trained and the parameters of ``params.yaml``, through
the stages' own functions (no cache is read or written):

1. selective search (``proposals``), seeded by the file's stem as the
   proposals stage seeds a dataset image by its id;
2. the recipe's features or head:

   * ``rcnn``: each proposal warped and run through the network of
     ``features.model`` (:mod:`stages.features`), ``features.batch_size`` at a time;
   * ``sppnet``: pyramids of the pre-trained conv map (:mod:`stages.spp_features`)
     through the trained fc layers (:mod:`stages.spp_recache`);
   * ``fast_rcnn_svm``: one conv pass of the Fast R-CNN model, its RoI-pooled
     and fc7 features (:mod:`stages.fast_rcnn_recache`);
   * ``fast_rcnn``, ``fast_rcnn_ohem`` and their ``_svd`` copies: one conv pass,
     the RoI head's probabilities and each class's box (:mod:`stages.fast_rcnn_detect`);

3. the feature recipes' SVMs (or softmax) and box regressors
   (:func:`stages.detect.detect_regions`), then every recipe's NMS and caps
   (the ``detect`` params).

``faster_rcnn`` and ``faster_rcnn_joint`` skip selective search: one conv pass
gives the RPN's proposals and the RoI head's detections
(:mod:`stages.faster_rcnn_detect`).

Features are stored in ``features.precision`` as the caches store them, so an
image of the test split gets the detections the pipeline's test run gave it;
R-CNN's may differ in the last bits, because a region's features depend on the
other regions of its mini-batch (:mod:`stages.features`).

Outputs, in ``out_dir``: ``detections.json``, the COCO results (one object a
line: ``image_id``, the image's 1-based position among the inputs,
``image_name``, its path as given, ``category_id``, ``category``, ``bbox``
``[x, y, w, h]`` in pixels and ``score``, as the detection stages write them);
``images.json``, COCO ``images`` (``id``, ``file_name``, ``width``,
``height``) and ``categories``, with the recipe and the digests of the models
used; and ``<stem>.png`` per image, its detections scoring at least
``min_score`` drawn.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from stages import detect, fast_rcnn_detect
from stages.core import layout
from stages.core.atomic import write_text
from stages.core.config import FASTER_RCNN_RECIPES, FEATURE_RECIPES, SVD_SUFFIX, Config, trained_model
from stages.core.device import pick_device
from stages.core.errors import PipelineError
from stages.core.provenance import file_digest
from stages.core.store import ArtifactError, PerImageReader
from stages.data import coco
from stages.data.detections import suppress
from stages.data.images import load_image, scaled_images
from stages.models.fast_rcnn import FC6, FastRcnn, conv_pass, image_rois, load_fast_rcnn
from stages.ops.boxes import as_boxes
from stages.tools.drawing import draw_detections, image_axes, save

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# (image file, decoded (H, W, 3) image, (M, 4) proposals) -> feature rows, or the detections themselves
ImageFunction = Callable[[Path, np.ndarray, np.ndarray], dict[str, np.ndarray]]
# (image file, decoded image) -> its detections and its number of proposals
ImageDetector = Callable[[Path, np.ndarray], tuple[dict[str, np.ndarray], int]]


def image_files(inputs: list[Path]) -> list[Path]:
    """The images to detect in: files as given, folders searched recursively for :data:`IMAGE_SUFFIXES`."""
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise PipelineError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise PipelineError(f"{path}: no such file or folder")
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            raise PipelineError(f"{stems[path.stem]} and {path} share the name {path.stem!r} (it names the drawn "
                                "PNG and seeds selective search): rename one, or predict them separately")
        stems[path.stem] = path
    return files


def model_files(cfg: Config, recipe: str) -> list[Path]:
    """The trained model files recipe ``recipe`` reads at test time under ``cfg``."""
    if recipe in FASTER_RCNN_RECIPES:
        return [layout.faster_rcnn_model(recipe)]
    if recipe not in FEATURE_RECIPES:
        return [layout.fast_rcnn_model(trained_model(recipe))]
    network = {"rcnn": [layout.FINETUNED_MODEL] if cfg.features.model == "finetuned" else [],
               "sppnet": [layout.SPP_HEAD]}.get(recipe, [layout.fast_rcnn_model(trained_model(recipe))])
    return [*network, *([layout.svm_model(recipe)] if cfg.detect.scorer == "svm" else []),
            *([layout.bbox_model(recipe)] if cfg.detect.box_regression else [])]


def _rcnn_features(cfg: Config, classes: list[str], device: torch.device) -> tuple[ImageFunction, int]:
    from stages.features import forward, load_network
    from stages.ops.warp import to_tensor_batch, warp_regions

    if cfg.detect.scorer == "softmax" and cfg.features.model == "imagenet":
        raise PipelineError("features.model: imagenet has no detection softmax; use detect.scorer: svm")
    model, _ = load_network(cfg.features, cfg.finetune, classes)
    model.to(device, memory_format=torch.channels_last).eval()
    fill, size, batch = tuple(255 * m for m in model.mean), model.input_size, cfg.features.batch_size

    def features(path: Path, image: np.ndarray, boxes: np.ndarray) -> dict[str, np.ndarray]:
        chunks = [forward(model, to_tensor_batch(warp_regions(image, boxes[s:s + batch], size, model.padding, fill),
                                                 model.mean, model.std), device, cfg.features.precision)
                  for s in range(0, len(boxes), batch)]
        return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}

    return features, model.pool_dim


def _spp_features(cfg: Config, classes: list[str], device: torch.device) -> tuple[ImageFunction, int]:
    from stages.models.backbones import build_backbone
    from stages.models.spp_head import load_head
    from stages.spp_features import image_pyramids
    from stages.spp_recache import head_outputs

    head = load_head(layout.SPP_HEAD).to(device)
    if head.classes != classes:
        raise ArtifactError(f"{layout.SPP_HEAD}: trained for classes {head.classes}, not the index's {classes} "
                            "(stale model; rerun spp_finetune)")
    backbone = build_backbone(cfg.finetune.arch, cfg.finetune.weights)
    backbone.to(device, memory_format=torch.channels_last).eval()
    spp, precision = cfg.sppnet, cfg.features.precision

    def features(path: Path, image: np.ndarray, boxes: np.ndarray) -> dict[str, np.ndarray]:
        resized, factors = scaled_images(path, spp.scales, spp.max_side, pin=device.type == "cuda")
        pool = image_pyramids(backbone, resized, boxes, factors, spp.levels, precision, device)
        fc, scores = head_outputs(head, pool, device)
        return {"pool": pool, "fc": fc.astype(precision), "scores": scores}

    return features, head.pool_dim


def _fast_rcnn(cfg: Config, recipe: str, classes: list[str], device: torch.device
               ) -> tuple[FastRcnn, Callable[[Path, np.ndarray], tuple[torch.Tensor, torch.Tensor]]]:
    """The recipe's Fast R-CNN model on ``device`` (its SVD copy for ``_svd``) and a function giving an image's
    conv map and the ``(M, 5)`` RoIs of its ``(M, 4)`` proposals."""
    model = load_fast_rcnn(layout.fast_rcnn_model(trained_model(recipe)), baked=True)
    if model.classes != classes:
        raise ArtifactError(f"{layout.fast_rcnn_model(trained_model(recipe))}: trained for classes "
                            f"{model.classes}, not the index's {classes} (stale model; rerun fast_rcnn_train)")
    if recipe.endswith(SVD_SUFFIX):
        model = model.compressed(cfg.fast_rcnn.svd_ranks)
    model.to(device)
    fast = cfg.fast_rcnn

    def conv_and_rois(path: Path, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        (resized,), (factor,) = scaled_images(path, fast.scales[:1], fast.max_side, pin=device.type == "cuda")
        return conv_pass(model, resized, device), image_rois(boxes, factor).to(device, non_blocking=True)

    return model, conv_and_rois


def _fast_rcnn_svm_features(cfg: Config, classes: list[str], device: torch.device) -> tuple[ImageFunction, int]:
    from stages.fast_rcnn_recache import region_features

    model, conv_and_rois = _fast_rcnn(cfg, trained_model("fast_rcnn_svm"), classes, device)

    def features(path: Path, image: np.ndarray, boxes: np.ndarray) -> dict[str, np.ndarray]:
        return region_features(model, *conv_and_rois(path, boxes), cfg.fast_rcnn.roi_chunk, cfg.features.precision)

    return features, model.fc[FC6].in_features


FEATURES = {"rcnn": _rcnn_features, "sppnet": _spp_features, "fast_rcnn_svm": _fast_rcnn_svm_features}


def detector(cfg: Config, recipe: str, classes: list[str], device: torch.device) -> ImageFunction:
    """The recipe's detections of one image from its proposals, with the models of ``model_files``."""
    if recipe in FEATURE_RECIPES:
        features, pool_dim = FEATURES[recipe](cfg, classes, device)
        svm, regressor, _ = detect.load_models(cfg.detect, classes, pool_dim, layout.svm_model(recipe),
                                               layout.bbox_model(recipe))

        def detect_features(path: Path, image: np.ndarray, boxes: np.ndarray) -> dict[str, np.ndarray]:
            rows = {"boxes": boxes, **features(path, image, boxes)}
            return detect.detect_regions(rows.__getitem__, svm, regressor, image_size(image), cfg.detect)

        return detect_features
    model, conv_and_rois = _fast_rcnn(cfg, recipe, classes, device)

    def detect_fast(path: Path, image: np.ndarray, boxes: np.ndarray) -> dict[str, np.ndarray]:
        probs, deltas = fast_rcnn_detect.head_outputs(model, *conv_and_rois(path, boxes), cfg.fast_rcnn.roi_chunk)
        return fast_rcnn_detect.detections(probs, deltas, boxes, image_size(image), cfg.detect)

    return detect_fast


def faster_rcnn_detector(cfg: Config, recipe: str, classes: list[str], device: torch.device) -> ImageDetector:
    """The detections of one image by Faster R-CNN recipe ``recipe``, from its own proposals."""
    from stages.faster_rcnn_detect import image_detections, image_proposals
    from stages.rpn_proposals import load_rpn

    model = load_rpn(layout.faster_rcnn_model(recipe))
    if model.classes != classes:
        raise ArtifactError(f"{layout.faster_rcnn_model(recipe)}: trained for classes {model.classes}, not the "
                            f"index's {classes} (stale model; rerun its training stage)")
    model.to(device)
    fast, detect = cfg.fast_rcnn, cfg.faster_rcnn.detection_params(cfg.detect)

    def detect_image(path: Path, image: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        (resized,), (factor,) = scaled_images(path, fast.scales[:1], fast.max_side, pin=device.type == "cuda")
        conv, boxes = image_proposals(model, resized, factor, cfg.faster_rcnn, device)
        return image_detections(model, conv, boxes, factor, image_size(image), detect, fast.roi_chunk), len(boxes)

    return detect_image


def image_detector(cfg: Config, recipe: str, classes: list[str], device: torch.device) -> ImageDetector:
    """The recipe's detections of one image and its number of proposals: selective search's then
    :func:`detector`'s, or a Faster R-CNN's own."""
    from stages.proposals import image_seed, selective_search

    if recipe in FASTER_RCNN_RECIPES:
        return faster_rcnn_detector(cfg, recipe, classes, device)
    detect_boxes = detector(cfg, recipe, classes, device)

    def detect_image(path: Path, image: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        boxes = selective_search(image, cfg.proposals, image_seed(cfg.proposals.seed, path.stem))
        return (detect_boxes(path, image, boxes) if len(boxes) else no_detections(image, cfg)), len(boxes)

    return detect_image


def image_size(image: np.ndarray) -> tuple[int, int]:
    """``(width, height)`` of an ``(H, W, 3)`` image."""
    return image.shape[1], image.shape[0]


def no_detections(image: np.ndarray, cfg: Config) -> dict[str, np.ndarray]:
    """The detections of an image without proposals: none, in the detections' dtypes."""
    return suppress(as_boxes([]), np.zeros(0, np.float32), np.zeros(0, np.int32), image_size(image), cfg.detect)


def run(cfg: Config, recipe: str, inputs: list[Path], out_dir: Path, min_score: float) -> dict[str, int]:
    """Detect with ``recipe`` in every image of ``inputs``; write ``out_dir``'s files. Returns the counts of
    images, of images without proposals and of detections."""
    files = image_files(inputs)
    with PerImageReader([layout.index_file(cfg.data.train_split)]) as index:
        classes = [str(c) for c in index.json_attr("classes")]
    device = pick_device()
    detect_image = image_detector(cfg, recipe, classes, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, images, without_proposals = [], [], 0
    with torch.inference_mode():
        for position, path in enumerate(tqdm(files, desc=f"predict {recipe}", unit="img")):
            image = load_image(path)
            found, proposals = detect_image(path, image)
            without_proposals += proposals == 0
            results += coco.result_entries(position, str(path), found, classes)
            images.append({"id": coco.image_id(position), "file_name": str(path), "width": image.shape[1],
                           "height": image.shape[0]})
            draw(image, found, classes, min_score, out_dir / f"{path.stem}.png", f"{path.name}: {recipe}")
    write_text(out_dir / "detections.json", "[" + ",".join("\n" + json.dumps(r) for r in results) + "\n]\n")
    described = {
        "recipe": recipe, "models": {str(p): file_digest(p) for p in model_files(cfg, recipe) if p.is_file()},
        "images": images, "categories": [{"id": coco.category_id(k), "name": c} for k, c in enumerate(classes)],
    }
    write_text(out_dir / "images.json", json.dumps(described, indent=1) + "\n")
    return {"images": len(files), "without_proposals": without_proposals, "detections": len(results)}


def draw(image: np.ndarray, found: dict[str, np.ndarray], classes: list[str], min_score: float, path: Path,
         title: str) -> None:
    """``image`` with its detections scoring at least ``min_score`` (red), to the PNG ``path``."""
    keep = found["scores"] >= min_score
    fig, ax = image_axes(image)
    draw_detections(ax, found["boxes"][keep], found["scores"][keep], found["labels"][keep], classes)
    save(fig, path, f"{title}, {int(keep.sum())} detections scoring >= {min_score:g}")
