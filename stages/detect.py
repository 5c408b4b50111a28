"""Stage ``detect``: score, refine and suppress the test split's proposals (R-CNN test time).

For every image of the test split's feature cache, in index order, only its
proposal rows (``gt_label == -1``) are used:

1. Scores ``(M, C)``: ``scorer: svm`` applies the class SVMs to the ``fc``
   features (:meth:`stages.models.svm.SvmModel.scores`); ``scorer: softmax`` takes the
   cached network probabilities without the background column
   (``scores[:, 1:]``), which only a network fine-tuned for detection has.
2. Per class, boxes scoring at least ``score_threshold`` are kept; with
   ``box_regression`` each is moved by the class's box regressor
   (:meth:`stages.models.box_regressor.BoxRegressor.predict` on its ``pool`` features), then
   clipped to the image; boxes left with no area are dropped.
3. Greedy NMS per class at ``nms_iou`` (:func:`torchvision.ops.nms`), then at most
   ``max_per_class`` detections per class, the highest scoring.

Outputs, over every image including those without detections:

* ``out_path``: per-image HDF5 (:mod:`stages.core.store`), rows ``boxes (K, 4)
  float32`` (continuous ``x1, y1, x2, y2``), ``scores (K,) float32``, ``labels
  (K,) int32`` (0-based index into ``classes``), ordered by class, then by
  decreasing score; attributes ``stage``, ``classes``, ``recipe``, ``split`` and the
  provenance (``params``: the ``detect`` section without ``recipes``, which does
  not change this output; ``code_version``; ``inputs``: digests of the
  feature shards and of the SVM and box-regressor files when used).
* ``coco_path``: the same detections as a COCO results JSON list, one object a
  line (:func:`stages.data.coco.result_entries`): ``image_id`` (1-based
  position of the image in the test split's index, the id of the ``coco_gt``
  stage's ground truth), ``image_name`` (the VOC id), ``category_id`` (class
  index + 1), ``category`` (class name), ``bbox`` ``[x, y, w, h]`` in
  continuous pixel coordinates rounded to 2 decimals (VOC's 1-based inclusive
  coordinates are ``xmin = x + 1, ymin = y + 1, xmax = x + w, ymax = y + h``)
  and ``score``. It is streamed into its temporary file, so memory does not
  grow with the split.
* ``timing_file(out_path)``: wall-clock seconds of this stage (scoring, box
  regression and NMS on cached features; not the feature extraction), kept
  apart so the HDF5 file stays byte-identical.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from stages.core import runs
from stages.core.config import DetectParams, as_dict
from stages.core.provenance import code_version, file_digest
from stages.core.store import ArtifactError
from stages.data.detections import DetectionWriter, suppress
from stages.data.featureset import FeatureSet
from stages.models.box_regressor import BoxRegressor, load_bbox
from stages.models.svm import SvmModel, load_svm
from stages.ops.boxes import as_boxes



def check_classes(path: Path, classes: list[str], expected: list[str]) -> None:
    """Raise :class:`ArtifactError` unless a model file was trained for the feature cache's classes."""
    if list(classes) != list(expected):
        raise ArtifactError(f"{path}: trained for classes {classes}, but the feature cache has {expected} "
                            "(stale model; rerun its stage)")


def check_softmax(features: FeatureSet) -> None:
    """Raise :class:`ArtifactError` if the cached scores come from an ImageNet network (no detection softmax)."""
    if features.attrs.get("model") == "imagenet":
        raise ArtifactError(
            f"{features.paths[0].parent}: features of the ImageNet network (features.model: imagenet) have no "
            "detection softmax; use detect.scorer: svm"
        )


def detect_image(
    boxes: np.ndarray,
    scores: np.ndarray,
    pool: np.ndarray | None,
    regressor: BoxRegressor | None,
    size: tuple[int, int],
    params: DetectParams,
) -> dict[str, np.ndarray]:
    """One image's detections: rows ``boxes``, ``scores``, ``labels`` of the output.

    ``boxes (M, 4)`` proposals, ``scores (M, C)``, ``pool (M, Dp)`` (only read
    with a ``regressor``), ``size`` the image's ``(width, height)``.
    """
    rows, labels = np.nonzero(scores >= params.score_threshold)
    candidates = as_boxes(boxes[rows])
    if regressor is not None:
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            candidates[members] = regressor.predict(int(c), pool[rows[members]], candidates[members])
    return suppress(candidates, scores[rows, labels], labels, size, params)


def detect_regions(
    read: Callable[[str], np.ndarray], svm: SvmModel | None, regressor: BoxRegressor | None,
    size: tuple[int, int], params: DetectParams,
) -> dict[str, np.ndarray]:
    """One image's detections from its proposals' feature rows: ``read(name)`` gives rows ``boxes``, ``fc``
    (scored by the SVMs), ``scores`` (the softmax, without SVMs) and ``pool`` (box regression), each read only
    when needed (:func:`detect_image`)."""
    scores = svm.scores(read("fc")) if svm is not None else read("scores")[:, 1:]
    reads_pool = regressor is not None and bool((scores >= params.score_threshold).any())
    return detect_image(read("boxes"), scores, read("pool") if reads_pool else None, regressor, size, params)


def load_models(
    params: DetectParams, classes: list[str], pool_dim: int, svm_path: Path, bbox_path: Path
) -> tuple[SvmModel | None, BoxRegressor | None, dict[str, str]]:
    """The SVMs (scorer svm) and box regressors (box_regression) the parameters ask for, checked against the
    features they will read (``classes``, ``pool_dim`` columns of ``pool``), and their digests."""
    svm = regressor = None
    inputs = {}
    if params.scorer == "svm":
        svm = load_svm(svm_path)
        check_classes(svm_path, svm.classes, classes)
        inputs[str(svm_path)] = file_digest(svm_path)
    if params.box_regression:
        regressor = load_bbox(bbox_path)
        check_classes(bbox_path, regressor.classes, classes)
        if regressor.weights.shape[1] != pool_dim:
            raise ArtifactError(f"{bbox_path}: regressors of pool dimension {regressor.weights.shape[1]}, but the "
                                f"features' is {pool_dim} (stale model; rerun the bbox stage)")
        inputs[str(bbox_path)] = file_digest(bbox_path)
    return svm, regressor, inputs


def detect_split(
    features: FeatureSet, svm: SvmModel | None, regressor: BoxRegressor | None, params: DetectParams
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """``(image_id, detections)`` of every image of ``features``, in order (:func:`detect_image`)."""
    for i in tqdm(range(len(features)), desc=f"detect {features.recipe}", unit="image"):
        proposals = np.flatnonzero(features.rows("gt_label", i) < 0)
        size = (int(features.value("widths", i)), int(features.value("heights", i)))
        yield features.image_ids[i], detect_regions(lambda name: features.rows(name, i)[proposals], svm, regressor,
                                                    size, params)


def run(
    params: DetectParams,
    recipe: str,
    test_split: str,
    num_shards: int,
    svm_path: Path,
    bbox_path: Path,
    out_path: Path,
    coco_path: Path,
) -> None:
    """Detect objects in every image of ``test_split``'s ``recipe`` feature cache; write the detections."""
    with FeatureSet(recipe, test_split, num_shards) as features:
        classes = features.classes
        if params.scorer == "softmax":
            check_softmax(features)
        svm, regressor, model_inputs = load_models(params, classes, features.dim("pool"), svm_path, bbox_path)
        attrs = {
            "stage": "detect", "classes": classes, "recipe": recipe, "split": test_split,
            "scores": params.score_kind(recipe),
            "params": {"detect": {k: v for k, v in as_dict(params).items() if k != "recipes"}},
            "code_version": code_version("detect"),
            "inputs": {**{str(p): file_digest(p) for p in features.paths}, **model_inputs},
        }
        start = time.perf_counter()
        with DetectionWriter(out_path, coco_path, attrs, classes) as writer:
            for image_id, detections in detect_split(features, svm, regressor, params):
                writer.append(image_id, detections)
        images, seconds = len(features), time.perf_counter() - start
    per_image = seconds / max(images, 1)
    timing = {"images": images, "wall_seconds": round(seconds, 3), "seconds_per_image": round(per_image, 6)}
    runs.record(out_path, timing)
    print(f"detect {recipe} {test_split}: {writer.total} detections in {images} images, {per_image:.4f} s/image",
          flush=True)
