"""COCO format: the test split's ground truth and the detections as COCO files, and pycocotools' box metrics.

The ids, defined here and nowhere else:

* ``image_id``: the 1-based position of the image in the test split's index
  (``features_cache/index/<split>.h5``): its first image is 1. The VOC id is
  kept beside it as ``image_name``, in the ground truth's ``images`` and in
  every result. The detect stage numbers the images of its feature cache,
  which holds the index's images in index order (the evaluate stage checks
  both files against the index).
* ``category_id``: the 1-based position of the class in ``classes``
  (class index + 1).
* annotation ``id``: 1-based, the ground-truth boxes counted in index order.

Boxes are ``[x, y, w, h]`` in the project's continuous pixels (``x = x1``,
``w = x2 - x1``), rounded to :data:`BOX_DECIMALS`; VOC's 1-based inclusive
corners are ``xmin = x + 1, ymin = y + 1, xmax = x + w, ymax = y + h``. A
box's ``area`` is ``w * h``.

VOC ``difficult`` boxes are ``iscrowd: 1`` and ``ignore: 1``. pycocotools
(bbox) takes ``ignore`` from ``iscrowd`` and never counts a crowd box as a
positive nor a detection matched to one as a true or false positive: VOC's
treatment of difficult boxes. Its matching differs from the devkit's in
details: a detection takes the best box not yet taken (the devkit: the best
box, a duplicate if taken), turns to a crowd box only when no other box
matches, and its IoU with a crowd box is the intersection over the
detection's own area.

The metrics are pycocotools' own (:func:`bbox_metrics`), the reference
implementation COCO numbers are compared against, rather than a rewrite.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from stages.core.store import ArtifactError, PerImageReader
from stages.ops.boxes import xyxy_to_xywh

BOX_DECIMALS = 2
# metric name -> its index in COCOeval.stats (summarize()'s order); AR100: average recall at 100 detections
METRICS = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR100": 8}


def image_id(position: int) -> int:
    """The COCO ``image_id`` of the image at 0-based ``position`` in the test split's index."""
    return position + 1


def category_id(label: int) -> int:
    """The COCO ``category_id`` of the 0-based class index ``label``."""
    return label + 1


def numbering(image_names: Sequence[str]) -> dict[int, str]:
    """``{image_id: VOC id}`` of a split's images given in index order."""
    return {image_id(position): name for position, name in enumerate(image_names)}


def coco_boxes(boxes: np.ndarray) -> list[list[float]]:
    """``(N, 4)`` continuous ``x1, y1, x2, y2`` -> ``N`` COCO ``[x, y, w, h]`` lists, rounded."""
    return np.round(xyxy_to_xywh(boxes), BOX_DECIMALS).tolist()


# --- the files -----------------------------------------------------------------------------------


def _image(index: PerImageReader, position: int) -> dict[str, Any]:
    return {"id": image_id(position), "file_name": index.value("paths", position),
            "image_name": index.image_ids[position], "width": int(index.value("widths", position)),
            "height": int(index.value("heights", position))}


def _annotations(index: PerImageReader, position: int, first_id: int) -> list[dict[str, Any]]:
    """The image's ground-truth boxes, numbered from ``first_id``; difficult ones as crowd, ignored."""
    boxes = coco_boxes(index.rows("gt_boxes", position))
    labels, difficult = index.rows("gt_labels", position).tolist(), index.rows("gt_difficult", position).tolist()
    return [{"id": first_id + k, "image_id": image_id(position), "category_id": category_id(label), "bbox": box,
             "area": round(box[2] * box[3], BOX_DECIMALS), "iscrowd": int(hard), "ignore": int(hard)}
            for k, (box, label, hard) in enumerate(zip(boxes, labels, difficult))]


def ground_truth(index: PerImageReader) -> dict[str, list[dict[str, Any]]]:
    """A split's index as a COCO annotation document: ``images``, ``annotations``, ``categories``."""
    images, annotations = [], []
    for position in range(len(index)):
        images.append(_image(index, position))
        annotations += _annotations(index, position, first_id=len(annotations) + 1)
    categories = [{"id": category_id(k), "name": name} for k, name in enumerate(index.json_attr("classes"))]
    return {"images": images, "annotations": annotations, "categories": categories}


def result_entries(
    position: int, image_name: str, detections: Mapping[str, np.ndarray], classes: Sequence[str]
) -> Iterator[dict[str, Any]]:
    """The detections (rows ``boxes``, ``scores``, ``labels``) of the image at ``position`` as COCO results."""
    for box, score, label in zip(coco_boxes(detections["boxes"]), detections["scores"].tolist(),
                                 detections["labels"].tolist()):
        yield {"image_id": image_id(position), "image_name": image_name, "category_id": category_id(label),
               "category": classes[label], "bbox": box, "score": score}


def dumps(document: Mapping[str, list]) -> str:
    """A document of lists as JSON with one image, box or category a line (greppable, loadable by any reader)."""
    sections = [f"{json.dumps(key)}: [\n" + ",\n".join(json.dumps(item) for item in items) + "\n]"
                for key, items in document.items()]
    return "{" + ",\n".join(sections) + "}\n"


# --- checks and metrics --------------------------------------------------------------------------


def check_ground_truth(ground_truth: Mapping[str, list], image_names: Sequence[str], path: Path) -> None:
    """Raise :class:`ArtifactError` unless the ground truth numbers exactly these images (in index order)."""
    if {image["id"]: image["image_name"] for image in ground_truth["images"]} != numbering(image_names):
        raise ArtifactError(f"{path}: its images differ from the index's (stale artifact; rerun the coco_gt stage)")


def check_results(results: Sequence[Mapping[str, Any]], image_names: Sequence[str], path: Path) -> None:
    """Raise :class:`ArtifactError` unless every result's ``image_id`` is the index's number of its ``image_name``."""
    names = numbering(image_names)
    for result in results:
        if names.get(result["image_id"]) != result["image_name"]:
            raise ArtifactError(
                f"{path}: a result for image {result['image_name']!r} has image_id {result['image_id']}, the index's "
                f"number of {names.get(result['image_id'])!r} (stale artifact; rerun the detect stage)"
            )


def _coco(document: Mapping[str, list]) -> COCO:
    coco = COCO()
    coco.dataset = dict(document)
    coco.createIndex()
    return coco


def bbox_metrics(ground_truth: Mapping[str, list], results: list[dict[str, Any]]) -> dict[str, float | None]:
    """pycocotools' ``COCOeval`` (``iouType="bbox"``) of ``results``: ``{name: value}`` for :data:`METRICS`.

    A metric pycocotools reports as -1 (no ground truth in that area range) is
    ``None``. Without any result, ``COCO.loadRes`` fails on the empty list, so
    the evaluation runs on an empty result set instead: 0 wherever there is
    ground truth. pycocotools' progress lines and summary table are swallowed.
    ``results`` gain the ``id``, ``area`` and ``iscrowd`` keys ``loadRes`` adds.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        truth = _coco(ground_truth)
        detections = truth.loadRes(results) if results else _coco({**ground_truth, "annotations": []})
        evaluation = COCOeval(truth, detections, iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: None if evaluation.stats[k] < 0 else float(evaluation.stats[k]) for name, k in METRICS.items()}
