"""Detections, every recipe's last step and output: per-class suppression and the writer of the detections files.

:func:`suppress` turns one image's scored candidate boxes into its detections
(clipping, per-class greedy NMS with :func:`torchvision.ops.nms`, the
per-class cap); :class:`DetectionWriter` writes a recipe's detections image
by image in the one detections format (see :mod:`stages.detect`): a
per-image HDF5 file with rows :data:`ROWS` and the COCO results JSON. Both the
``detect`` and the ``fast_rcnn_detect`` stages use them, so the format has one
home and neither stage depends on the other's code.
"""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import nms

from stages.core.atomic import atomic_path
from stages.core.config import DetectParams
from stages.core.store import ArtifactError, PerImageReader, RowSpec, create_per_image
from stages.data import coco
from stages.ops.boxes import as_boxes, clip_boxes

ROWS = {"boxes": RowSpec((4,), np.float32), "scores": RowSpec((), np.float32), "labels": RowSpec((), np.int32)}
SCORE_KINDS = ("svm", "probability")  # the ``scores`` attribute: SVM margins or class probabilities


def read_score_kind(detections: PerImageReader) -> str:
    """What an open detections file's scores are, one of :data:`SCORE_KINDS` (its ``scores`` attribute)."""
    kind = detections.attrs.get("scores")
    if kind not in SCORE_KINDS:
        raise ArtifactError(f"{detections.paths[0]}: scores attribute {kind!r}, expected one of {list(SCORE_KINDS)} "
                            "(written by an older version; rerun its detection stage)")
    return str(kind)


def select(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, params: DetectParams) -> np.ndarray:
    """Indices kept by per-class greedy NMS and the per-class cap, ordered by class then decreasing score.

    ``boxes (K, 4)``, ``scores (K,)``, ``labels (K,)``: candidates of one image.
    """
    kept = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        class_boxes, class_scores = as_boxes(boxes[members]), np.ascontiguousarray(scores[members], np.float32)
        order = nms(torch.from_numpy(class_boxes), torch.from_numpy(class_scores), params.nms_iou).numpy()
        kept.append(members[order[:params.max_per_class]])
    return np.concatenate(kept) if kept else np.zeros(0, np.int64)


def suppress(
    candidates: np.ndarray, scores: np.ndarray, labels: np.ndarray, size: tuple[int, int], params: DetectParams
) -> dict[str, np.ndarray]:
    """Every recipe's last step: clip ``(K, 4)`` candidate boxes to the image, drop empty ones, per-class NMS and cap.

    ``scores (K,)`` and ``labels (K,)`` (0-based classes) go with the
    candidates, already above ``score_threshold``; ``size`` is ``(width, height)``.
    """
    candidates = clip_boxes(as_boxes(candidates), *size)
    nonempty = (candidates[:, 2] > candidates[:, 0]) & (candidates[:, 3] > candidates[:, 1])
    candidates, scores, labels = candidates[nonempty], scores[nonempty].astype(np.float32), labels[nonempty]
    keep = select(candidates, scores, labels, params)
    return {"boxes": candidates[keep], "scores": scores[keep], "labels": labels[keep].astype(np.int32)}


class DetectionWriter:
    """Writes one recipe's detections, image by image: the per-image HDF5 file and the COCO results JSON.

    Both are written atomically when the block ends without an error; the
    JSON is streamed, so memory does not grow with the split.
    """

    def __init__(self, out_path: Path, coco_path: Path, attrs: dict, classes: list[str]) -> None:
        if attrs.get("scores") not in SCORE_KINDS:
            raise ValueError(f"{out_path}: attrs need 'scores', one of {list(SCORE_KINDS)}; "
                             f"got {attrs.get('scores')!r}")
        self.paths, self.attrs, self.classes = (out_path, coco_path), attrs, classes
        self.total = 0
        self._stack = ExitStack()

    def __enter__(self) -> "DetectionWriter":
        out_path, coco_path = self.paths
        coco_tmp = self._stack.enter_context(atomic_path(coco_path, ".json"))
        self._results = self._stack.enter_context(open(coco_tmp, "w"))
        self._writer = self._stack.enter_context(create_per_image(out_path, ROWS, self.attrs))
        self._results.write("[")
        self._position = 0
        return self

    def append(self, image_id: str, detections: dict[str, np.ndarray]) -> None:
        self._writer.append(image_id, detections)
        for entry in coco.result_entries(self._position, image_id, detections, self.classes):
            self._results.write(("\n" if self.total == 0 else ",\n") + json.dumps(entry))
            self.total += 1
        self._position += 1

    def note(self, name: str, value: int | float | str) -> None:
        """Record a fact known only at the end (a count) as an attribute of the HDF5 file."""
        self._writer.file.attrs[name] = value

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self._results.write("\n]\n")
        self._stack.__exit__(*exc)
