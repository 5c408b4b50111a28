"""Per-class linear SVMs on cached fc features: the model the ``svm`` stage writes and ``detect`` reads."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from stages.core.errors import PipelineError
from stages.core.store import write_arrays

_MODEL_ATTRS = ("format_version", "stage", "feature_scale", "classes")


class SvmError(PipelineError, ValueError):
    """An SVM model file is missing or unusable, or the feature cache cannot train SVMs."""


# --- the model -----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SvmModel:
    """Per-class linear SVMs: ``weights (K, D) float32``, ``biases (K,) float32``, ``classes`` (K names).

    ``feature_scale`` multiplies the raw fc features before the dot product.
    """

    weights: np.ndarray
    biases: np.ndarray
    feature_scale: float
    classes: list[str]

    def __post_init__(self) -> None:
        weights = np.asarray(self.weights, dtype=np.float32)
        biases = np.asarray(self.biases, dtype=np.float32)
        if weights.ndim != 2 or biases.shape != (len(weights),) or len(self.classes) != len(weights):
            raise ValueError(f"need weights (K, D), biases (K,) and K classes, got {weights.shape}, "
                             f"{biases.shape} and {len(self.classes)} classes")
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "biases", biases)
        object.__setattr__(self, "feature_scale", float(self.feature_scale))
        object.__setattr__(self, "classes", [str(c) for c in self.classes])

    def scores(self, fc: np.ndarray) -> np.ndarray:
        """``(M, D)`` raw fc features -> ``(M, K)`` float32 SVM scores."""
        fc = np.asarray(fc)
        if fc.ndim != 2 or fc.shape[1] != self.weights.shape[1]:
            raise SvmError(f"features of shape {fc.shape} do not fit SVMs of dimension {self.weights.shape[1]} "
                           "(the SVM model and the feature cache come from different runs; rerun the svm stage)")
        return scale_features(fc, self.feature_scale) @ self.weights.T + self.biases

    def save(self, path: str | Path, attrs: Mapping[str, Any]) -> None:
        """Write the model atomically to ``path`` with extra attributes ``attrs`` (non-scalars as JSON)."""
        reserved = sorted(set(attrs) & set(_MODEL_ATTRS))
        if reserved:
            raise ValueError(f"attributes {reserved} are written by SvmModel.save itself")
        write_arrays(path, {"weights": self.weights, "biases": self.biases},
                     {"stage": "svm", "feature_scale": self.feature_scale, "classes": list(self.classes), **attrs})


def load_svm(path: str | Path) -> SvmModel:
    """The :class:`SvmModel` saved at ``path``; :class:`SvmError` if it is missing or not an SVM model file."""
    path = Path(path)
    if not path.is_file():
        raise SvmError(f"{path}: SVM model file not found (run the svm stage first)")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("stage") != "svm":
                raise KeyError("attribute stage is not 'svm'")
            return SvmModel(f["weights"][:], f["biases"][:], float(f.attrs["feature_scale"]),
                            json.loads(f.attrs["classes"]))
    except (KeyError, OSError, ValueError, TypeError) as exc:
        raise SvmError(f"{path}: not an SVM model file of this pipeline ({exc})") from None


def scale_features(fc: np.ndarray, scale: float) -> np.ndarray:
    """``(M, D)`` raw features (float16 or float32) -> ``(M, D)`` float32 ``fc * scale``."""
    return np.asarray(fc, dtype=np.float32) * np.float32(scale)


# --- image order and solver seeds ---------------------------------------------------------------
