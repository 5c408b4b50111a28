"""Class-specific linear box regressors on cached pool features: what ``bbox`` writes and ``detect`` reads."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from stages.core.store import ArtifactError, write_arrays
from stages.ops.boxes import as_boxes, decode_boxes


@dataclass
class BoxRegressor:
    """Per-class linear regressors from scaled pool features to standardised box offsets.

    ``weights (C, Dp, 4)``, ``biases (C, 4)``, ``target_mean (C, 4)``,
    ``target_std (C, 4)`` float32; ``trained (C,)`` bool.
    """

    weights: np.ndarray
    biases: np.ndarray
    target_mean: np.ndarray
    target_std: np.ndarray
    feature_scale: float
    classes: list[str]
    trained: np.ndarray

    def deltas(self, class_index: int, pool: np.ndarray) -> np.ndarray:
        """``(M, Dp)`` pool features -> ``(M, 4)`` float32 offsets ``tx, ty, tw, th`` predicted for ``class_index``."""
        c = class_index
        x = np.asarray(pool, np.float32) * np.float32(self.feature_scale)
        return (x @ self.weights[c] + self.biases[c]) * self.target_std[c] + self.target_mean[c]

    def predict(self, class_index: int, pool: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """``(M, Dp)`` pool features, ``(M, 4)`` boxes -> ``(M, 4)`` float32 regressed boxes (not clipped)."""
        boxes = as_boxes(boxes)
        if not self.trained[class_index] or len(boxes) == 0:
            return boxes.copy()
        return decode_boxes(boxes, self.deltas(class_index, pool))

    def save(self, path: Path, attrs: Mapping[str, Any]) -> None:
        """Write the model atomically; ``attrs`` (provenance, stats) become root attributes, JSON if not scalar."""
        arrays = {name: np.asarray(getattr(self, name), np.float32)
                  for name in ("weights", "biases", "target_mean", "target_std")}
        write_arrays(path, {**arrays, "trained": np.asarray(self.trained, bool)},
                     {"stage": "bbox", "feature_scale": float(self.feature_scale), "classes": list(self.classes), **attrs})


def load_bbox(path: str | Path) -> BoxRegressor:
    """The :class:`BoxRegressor` written by :func:`run`; :class:`ArtifactError` if missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: box-regressor file not found (run the bbox stage first)")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("stage") != "bbox":
                raise KeyError("attribute stage is not 'bbox'")
            model = BoxRegressor(
                weights=f["weights"][:], biases=f["biases"][:], target_mean=f["target_mean"][:],
                target_std=f["target_std"][:], feature_scale=float(f.attrs["feature_scale"]),
                classes=[str(c) for c in json.loads(f.attrs["classes"])], trained=f["trained"][:],
            )
    except (OSError, KeyError, ValueError) as exc:
        raise ArtifactError(f"{path}: not a box-regressor file of this pipeline ({exc})") from None
    return model
