"""Stage ``faster_rcnn_detect``: Faster R-CNN test time, proposals and detections from one conv pass per image.

For every image of the test split, in index order: one conv pass of the whole
image, resized as in training (shorter side ``fast_rcnn.scales[0]``, longer at
most ``fast_rcnn.max_side``); the model's RPN on that map
(:func:`stages.models.fast_rcnn.propose_image`: ``faster_rcnn.test_pre_nms``
best boxes, those under ``min_size`` dropped, NMS at ``nms_iou``, the
``test_proposals`` best); every proposal through the detector's RoI head on the
same map, then per class its probability and its own regressed box and the
project's last step (:func:`stages.data.detections.suppress`, its per-class
NMS at ``faster_rcnn.detection_nms_iou``), as ``fast_rcnn_detect`` does with
selective search's boxes
(:func:`stages.fast_rcnn_detect.head_outputs`, :func:`~stages.fast_rcnn_detect.detections`).

Recipes: ``faster_rcnn`` (the alternating training's final model: step 5's
detector with step 4's RPN) and ``faster_rcnn_joint``. An image for which the
RPN proposes nothing gets no detections; their count is the detections file's
attribute ``without_proposals``. The run records hold the mean proposals per
image and the seconds per image of the conv pass and RPN together
(``proposal_seconds_per_image``), of the head and NMS, and of the whole
detection.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stages.core import runs
from stages.core.config import FASTER_DETECT_KEYS, DetectParams, FasterRcnnParams, FastRcnnParams, as_dict
from stages.core.device import pick_device
from stages.core.layout import index_file
from stages.core.provenance import code_version, file_digest
from stages.core.store import ArtifactError, PerImageReader
from stages.data.detections import DetectionWriter
from stages.fast_rcnn_detect import detections, head_outputs, synchronize
from stages.models.fast_rcnn import FasterRcnn, image_rois, propose_image, resized_images
from stages.rpn_proposals import load_rpn


def image_proposals(model: FasterRcnn, image: torch.Tensor, factor: float, params: FasterRcnnParams,
                    device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """The conv map of an ``(h, w, 3)`` image resized by ``factor`` and its ``(P, 4)`` test-time RPN proposals in
    pixels of the original image."""
    conv, proposals = propose_image(model, image, params, False, device)
    return conv, (proposals / factor).cpu().numpy()


def image_detections(model: FasterRcnn, conv: torch.Tensor, boxes: np.ndarray, factor: float, size: tuple[int, int],
                     params: DetectParams, chunk: int) -> dict[str, np.ndarray]:
    """The detections of an image of ``size`` (width, height) from its conv map and ``(P, 4)`` proposals."""
    probs, deltas = head_outputs(model, conv, image_rois(boxes, factor).to(conv.device), chunk)
    return detections(probs, deltas, boxes, size, params)


def run(
    params: DetectParams,
    fast_rcnn: FastRcnnParams,
    faster_rcnn: FasterRcnnParams,
    recipe: str,
    test_split: str,
    model_path: Path,
    out_path: Path,
    coco_path: Path,
    num_workers: int = 0,
) -> None:
    """Detect with Faster R-CNN model ``recipe`` on ``test_split``."""
    params = faster_rcnn.detection_params(params)
    model, device = load_rpn(model_path), pick_device()
    model.to(device)
    index_path = index_file(test_split)
    with PerImageReader([index_path]) as index:
        classes = [str(c) for c in index.json_attr("classes")]
        if classes != model.classes:
            raise ArtifactError(f"{model_path}: trained for classes {model.classes}, but the {test_split} index has "
                                f"{classes} (stale model; rerun its training stage)")
        attrs = {
            "stage": "faster_rcnn_detect", "recipe": recipe, "classes": classes, "split": test_split,
            "scores": params.score_kind(recipe),
            "params": {name: {k: as_dict(section)[k] for k in FASTER_DETECT_KEYS[name]} for name, section
                       in (("detect", params), ("fast_rcnn", fast_rcnn), ("faster_rcnn", faster_rcnn))},
            "code_version": code_version("faster_rcnn_detect"),
            "inputs": {"index": file_digest(index_path), "model": file_digest(model_path)},
        }
        root = Path(index.attrs["data_root"])
        loader = resized_images([str(root / index.value("paths", i)) for i in range(len(index))], fast_rcnn.scales[0],
                                fast_rcnn.max_side, device, num_workers)
        seconds, without, proposed, start = {"proposals": 0.0, "head": 0.0}, 0, 0, time.perf_counter()
        with DetectionWriter(out_path, coco_path, attrs, classes) as writer, torch.inference_mode():
            for i, (image, factor) in enumerate(tqdm(loader, total=len(index), desc=f"faster_rcnn_detect {recipe}",
                                                     unit="img")):
                size = (int(index.value("widths", i)), int(index.value("heights", i)))
                tic = time.perf_counter()
                conv, boxes = image_proposals(model, image, factor, faster_rcnn, device)
                synchronize(device)
                seconds["proposals"] += time.perf_counter() - tic
                tic = time.perf_counter()
                without, proposed = without + (len(boxes) == 0), proposed + len(boxes)
                writer.append(index.image_ids[i], image_detections(model, conv, boxes, factor, size, params,
                                                                   fast_rcnn.roi_chunk))
                seconds["head"] += time.perf_counter() - tic
            writer.note("without_proposals", without)
        wall, count = time.perf_counter() - start, len(index)
    images = max(1, count)
    per_image = (seconds["proposals"] + seconds["head"]) / images
    runs.record(out_path, {"images": count, "proposals_per_image": round(proposed / images, 3),
                           "proposal_seconds_per_image": round(seconds["proposals"] / images, 6),
                           "head_seconds_per_image": round(seconds["head"] / images, 6),
                           "seconds_per_image": round(per_image, 6), "stage_wall_seconds": round(wall, 3)})
    if without:
        print(f"warning: the RPN proposed nothing for {without} of {count} images (no detections there)", flush=True)
    print(f"faster_rcnn_detect {recipe} {test_split}: {writer.total} detections, {per_image:.4f} s/image "
          f"(conv and RPN {seconds['proposals'] / images:.4f}, head and NMS {seconds['head'] / images:.4f})",
          flush=True)
