"""Stage ``svm``: one linear SVM per class on fc features, with hard-negative mining (R-CNN step 4).

Features. Every fc row is multiplied by ``feature_scale = target_norm / m``,
where ``m`` is the mean L2 norm of a fixed sample of rows
(:func:`stages.data.featureset.feature_scale`, as ``rcnn_feature_stats.m``):
:data:`NORM_IMAGES` images drawn with a generator seeded by ``seed``, then
``norm_sample`` of their rows drawn uniformly without replacement (all of them
if they hold fewer), read image by image.

Examples of class ``c``. Positives: the ground-truth rows of class ``c``
(``gt_label == c``), difficult ones included (the cache does not mark them).
Negatives: every row, proposal or ground truth of another class, whose
``iou[:, c]`` is below ``neg_iou``. Rows in between are ignored.

Training (``rcnn_train.m``). Each class keeps a cache: all its positives and
the negatives mined so far. The images are visited in a permutation drawn from
``(seed, pass)``, ``passes`` times. Each image's negatives are scored by the
class's current model; those scoring above ``hard_threshold`` that are not in
the cache (key: image, row) join it; while a class has no model yet, all of
them join. The SVM is (re)trained when the cache first holds negatives, when
``retrain_every`` or more negatives joined since the last training (the
reference retrains after *more than* its limit; here *at least*), and after the
last image of the last pass. After each training, cached negatives scoring
below ``easy_threshold`` are evicted. With ``mining: false`` (the baseline of
the mining benchmark) every negative of every image joins and the SVM is
trained once, at the end: memory then grows with the number of negatives.

The solver is liblinear's L2-regularised hinge loss (sklearn
``LinearSVC(loss="hinge", dual=True)``), regularisation ``C_c`` for class
``c`` (:func:`class_C`), positive-class weight
``positive_weight`` and bias multiplier ``intercept_scaling`` = ``s``:
liblinear appends a constant feature ``s`` to every example, so it also
regularises the bias ``b = s * w_s``. The objective it minimises, and that the
report records for every training round, is therefore::

    0.5 * |w|^2 + 0.5 * (b / s)^2 + C_c * positive_weight * sum_pos max(0, 1 - z) + C_c * sum_neg max(0, 1 + z)

with ``z = w . x + b`` (``x`` scaled). The hinge losses add up over the
examples, so one ``C`` regularises a class of 40 positives far harder than one
of 3,000: ``C_c = C * C_positives / P_c`` keeps each class's balance of loss
and margin that of a class of ``C_positives`` positives at ``C`` (R-CNN's
0.001 at VOC07's ~630 a class); ``C_positives: 0`` gives every class ``C``.
liblinear's coordinate descent visits the
examples in an order drawn from a seed derived from ``(seed, class)``, so each
class's model depends only on the data and the parameters, never on the number
of worker processes. A class with no positives, or one that never meets a
negative, cannot be trained: it gets zero weights and bias :data:`NEVER_BIAS`
(it never detects anything), a warning, and its status in the report.

Classes are trained in parallel: spawned worker processes each take a subset
of the classes and make their passes over the images for all of them at
once, reading each image's rows once per pass; the positives are collected
beforehand in one pass by the parent. Memory is bounded by the positives and
the negative caches, never by the size of the feature cache.

Outputs. The model: HDF5 with datasets ``weights (K, D) float32`` and
``biases (K,) float32`` (``K`` classes), attributes ``feature_scale``, ``classes`` (JSON),
``recipe``, ``split`` and the provenance (``params``, ``code_version``,
``inputs``), read back with :func:`load_svm`; scores are
``(fc * feature_scale) @ weights.T + biases``. The report (JSON):
``feature_scale``, ``mean_norm``, and per class its ``status``, ``C``, ``positives``,
``negatives_seen``, ``final_cache_negatives`` and the ``rounds`` (one per
training: ``pass``, ``image``, ``cache_negatives``, ``new_negatives``,
``evicted``, ``objective`` and its three terms, ``iterations``). The seconds
of the stage, of each class's training and of each round differ from run to
run: they go to the run record of the model (:mod:`stages.core.runs`).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.svm import LinearSVC
from tqdm import tqdm

from stages.core import runs
from stages.core.atomic import write_text
from stages.core.config import SvmParams, as_dict
from stages.core.kernels import one_blas_thread
from stages.core.provenance import code_version, file_digest
from stages.data.featureset import FeatureSet, feature_scale
from stages.models.svm import SvmError, SvmModel, scale_features

NEVER_BIAS = -1000.0  # bias of a class that could not be trained: it never scores above any threshold
NORM_IMAGES = 200  # images sampled to estimate the mean feature norm (rcnn_feature_stats.m)
MAX_ITER = 100_000  # liblinear passes over the cache; a round that needs them all is reported
TOLERANCE = 1e-4  # liblinear stopping tolerance




def image_order(num_images: int, seed: int, pass_index: int) -> np.ndarray:
    """``(num_images,)`` the order in which pass ``pass_index`` visits the images."""
    return np.random.default_rng([seed, pass_index]).permutation(num_images)


def class_seed(seed: int, class_index: int) -> int:
    """liblinear's random state for class ``class_index``: a function of both numbers only."""
    return int(np.random.SeedSequence([seed, class_index]).generate_state(1)[0])


def class_C(params: SvmParams, positives: int) -> float:
    """liblinear's ``C`` for a class of ``positives`` ground-truth boxes (at least one)."""
    return params.C * params.C_positives / positives if params.C_positives else params.C


# --- one SVM -------------------------------------------------------------------------------------


def fit_svm(
    positives: np.ndarray, negatives: np.ndarray, params: SvmParams, C: float, random_state: int
) -> tuple[np.ndarray, np.float32, int]:
    """Train on ``(P, D)`` positives and ``(N, D)`` negatives (scaled, both non-empty) at regularisation ``C``.

    Returns the weights ``(D,)`` float32, the bias (float32) and liblinear's iteration count.
    """
    svm = LinearSVC(
        loss="hinge",
        dual=True,
        C=C,
        class_weight={1: params.positive_weight, 0: 1.0},
        fit_intercept=True,
        intercept_scaling=params.intercept_scaling,
        tol=TOLERANCE,
        max_iter=MAX_ITER,
        random_state=random_state,
    )
    x = np.concatenate([positives, negatives])
    y = np.concatenate([np.ones(len(positives), np.int64), np.zeros(len(negatives), np.int64)])
    svm.fit(x, y)
    return svm.coef_[0].astype(np.float32), np.float32(svm.intercept_[0]), int(np.max(svm.n_iter_))


def objective(
    weights: np.ndarray, bias: float, z_pos: np.ndarray, z_neg: np.ndarray, params: SvmParams, C: float
) -> dict[str, float]:
    """liblinear's primal objective at regularisation ``C`` and its terms, for scores ``z_pos (P,)`` and
    ``z_neg (N,)``.

    The regulariser includes the bias as liblinear sees it: ``b / intercept_scaling``.
    """
    w = np.asarray(weights, dtype=np.float64)
    loss_positive = C * params.positive_weight * float(np.maximum(0.0, 1.0 - np.float64(z_pos)).sum())
    loss_negative = C * float(np.maximum(0.0, 1.0 + np.float64(z_neg)).sum())
    regulariser = 0.5 * float(w @ w) + 0.5 * (float(bias) / params.intercept_scaling) ** 2
    return {
        "objective": loss_positive + loss_negative + regulariser,
        "loss_positive": loss_positive,
        "loss_negative": loss_negative,
        "regulariser": regulariser,
    }


class HardNegativeMiner:
    """The training cache of one class and its mining rules (see the module docstring).

    Feed it every image of every pass with :meth:`see_image`; it trains
    whenever the rules say so, at the class's ``C`` (:func:`class_C`).
    ``mining=False`` keeps every negative and trains only at the last image.
    """

    def __init__(self, positives: np.ndarray, params: SvmParams, random_state: int, mining: bool = True) -> None:
        self.positives = np.asarray(positives, dtype=np.float32)
        self.params = params
        self.C = class_C(params, len(self.positives))
        self.random_state = random_state
        self.mining = mining
        self.weights: np.ndarray | None = None
        self.bias = np.float32(0.0)
        self.rounds: list[dict[str, Any]] = []
        self.negatives_seen = 0
        self.added = 0  # negatives added since the last training
        dim = self.positives.shape[1]
        self._cache = np.zeros((0, dim), np.float32)
        self._keys = np.zeros(0, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._known: set[int] = set()
        self._where = (0, 0)

    @property
    def cache_size(self) -> int:
        return len(self._keys) + sum(len(k) for k, _ in self._pending)

    def score(self, features: np.ndarray) -> np.ndarray:
        """``(K, D)`` scaled features -> ``(K,)`` float32 scores of the current model (one per row, always)."""
        return features @ self.weights + self.bias

    def see_image(
        self, image: int, rows: np.ndarray, features: np.ndarray, last: bool, where: tuple[int, int] = (0, 0)
    ) -> None:
        """Offer image ``image``'s negatives: row numbers ``rows (K,)``, scaled ``features (K, D)``.

        ``last``: the last image of the last pass. ``where`` = (pass, image
        position), both 1-based, only recorded in the rounds.
        """
        self._where = where
        self.negatives_seen += len(rows)
        keys = (np.int64(image) << 32) + np.asarray(rows, dtype=np.int64)
        keep = np.arange(len(keys))
        if self.mining and self.weights is not None:
            keep = np.flatnonzero(self.score(features) > self.params.hard_threshold)
        keep = np.array([k for k in keep if int(keys[k]) not in self._known], np.int64)  # not cached already
        if len(keep):
            self._pending.append((keys[keep], np.asarray(features[keep], np.float32)))
            self._known.update(keys[keep].tolist())
            self.added += len(keep)
        if self.cache_size and self._due(last):
            self.train()

    def _due(self, last: bool) -> bool:
        if not self.mining:
            return last
        return last or self.weights is None or self.added >= self.params.retrain_every

    def train(self) -> None:
        """Retrain on the cache, record the round, evict the easy negatives."""
        if self._pending:
            self._keys = np.concatenate([self._keys] + [k for k, _ in self._pending])
            self._cache = np.concatenate([self._cache] + [x for _, x in self._pending])
            self._pending = []
        start = time.perf_counter()
        self.weights, self.bias, iterations = fit_svm(self.positives, self._cache, self.params, self.C,
                                                      self.random_state)
        seconds = time.perf_counter() - start
        z_neg = self.score(self._cache)
        easy = z_neg < self.params.easy_threshold
        self.rounds.append({
            "pass": self._where[0],
            "image": self._where[1],
            "cache_negatives": len(self._keys),
            "new_negatives": self.added,
            "evicted": int(easy.sum()),
            **objective(self.weights, self.bias, self.score(self.positives), z_neg, self.params, self.C),
            "iterations": iterations,
            "seconds": seconds,
        })
        self._known.difference_update(self._keys[easy].tolist())
        self._keys, self._cache = self._keys[~easy], self._cache[~easy]
        self.added = 0


# --- passes over the feature cache ---------------------------------------------------------------


@dataclass
class ClassResult:
    """One class's trained SVM (``weights (D,)``, ``bias``) or its failure, and its mining statistics."""

    index: int
    status: str  # trained | no_positives | no_negatives
    weights: np.ndarray
    bias: float
    positives: int
    C: float | None = None  # liblinear's, for a class that has positives
    negatives_seen: int = 0
    final_cache_negatives: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "C": self.C,
            "positives": self.positives,
            "negatives_seen": self.negatives_seen,
            "final_cache_negatives": self.final_cache_negatives,
            "seconds": sum(r["seconds"] for r in self.rounds),
            "rounds": self.rounds,
        }


@dataclass(frozen=True)
class MiningTask:
    """What one worker trains: the classes ``class_indices`` with their scaled ``positives``."""

    recipe: str
    split: str
    num_shards: int
    params: SvmParams
    feature_scale: float
    class_indices: tuple[int, ...]
    positives: tuple[np.ndarray, ...]
    position: int = 0  # of the worker's progress bar


def collect_positives(features: FeatureSet, scale: float, num_classes: int) -> list[np.ndarray]:
    """Scaled fc rows of the ground truth, per class: ``num_classes`` arrays ``(P_c, D)`` float32."""
    blocks: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    for i in tqdm(range(len(features)), desc="svm positives", unit="image"):
        labels = features.rows("gt_label", i)
        gt = np.flatnonzero(labels >= 0)
        if len(gt):
            fc = scale_features(features.rows("fc", i)[gt], scale)
            for c in np.unique(labels[gt]):
                blocks[c].append(fc[labels[gt] == c])
    dim = features.dim("fc")
    return [np.concatenate(b) if b else np.zeros((0, dim), np.float32) for b in blocks]


def mine(task: MiningTask) -> list[ClassResult]:
    """Train the task's classes in ``passes`` passes over the images (one if not mining); one thread."""
    params = task.params
    miners = [HardNegativeMiner(p, params, class_seed(params.seed, c), params.mining)
              for c, p in zip(task.class_indices, task.positives)]
    passes = params.passes if params.mining else 1
    names = ",".join(str(c) for c in task.class_indices)
    with one_blas_thread(), FeatureSet(task.recipe, task.split, task.num_shards) as features:
        for p in range(passes):
            order = image_order(len(features), params.seed, p)
            for step, i in enumerate(tqdm(order, desc=f"svm classes {names} pass {p + 1}/{passes}",
                                          unit="image", position=task.position)):
                _offer_image(features, int(i), miners, task, last=p == passes - 1 and step == len(order) - 1,
                             where=(p + 1, step + 1))
    return [_result(c, m) for c, m in zip(task.class_indices, miners)]


def _offer_image(features: FeatureSet, i: int, miners: list[HardNegativeMiner], task: MiningTask, last: bool,
                 where: tuple[int, int]) -> None:
    """Give every miner image ``i``'s negatives of its class."""
    iou, labels = features.rows("iou", i), features.rows("gt_label", i)
    fc = scale_features(features.rows("fc", i), task.feature_scale)
    for c, miner in zip(task.class_indices, miners):
        rows = np.flatnonzero((iou[:, c] < task.params.neg_iou) & (labels != c))
        miner.see_image(i, rows, fc[rows], last, where)


def _result(class_index: int, miner: HardNegativeMiner) -> ClassResult:
    dim = miner.positives.shape[1]
    if miner.weights is None:
        return ClassResult(class_index, "no_negatives", np.zeros(dim, np.float32), NEVER_BIAS, len(miner.positives),
                           miner.C, miner.negatives_seen)
    return ClassResult(class_index, "trained", miner.weights, float(miner.bias), len(miner.positives),
                       miner.C, miner.negatives_seen, miner.cache_size, miner.rounds)


def _mine_all(tasks: list[MiningTask]) -> list[ClassResult]:
    """Run the tasks in spawned worker processes (in this process if there is only one)."""
    if len(tasks) <= 1:
        return [r for task in tasks for r in mine(task)]
    # spawn, not fork: a fork of a process whose BLAS/HDF5 threads already run can deadlock
    with multiprocessing.get_context("spawn").Pool(len(tasks)) as pool:
        return [r for results in pool.imap(mine, tasks) for r in results]


def _warn_untrained(classes: list[str], results: list[ClassResult]) -> None:
    why = {"no_positives": "it has no ground-truth box in the training split",
           "no_negatives": "it met no negative (no box with IoU below svm.neg_iou)"}
    for r in results:
        if r.status != "trained":
            print(f"warning: svm: class {classes[r.index]!r} cannot be trained: {why[r.status]}; "
                  f"it gets zero weights and bias {NEVER_BIAS} and will never be detected", file=sys.stderr, flush=True)


def run(
    params: SvmParams,
    recipe: str,
    train_split: str,
    num_shards: int,
    out_path: Path,
    report_path: Path,
    num_workers: int = 0,
) -> None:
    """Train the per-class SVMs on ``recipe``'s feature cache of ``train_split``; write the model and report."""
    start = time.perf_counter()
    with FeatureSet(recipe, train_split, num_shards) as features:
        classes, dim = features.classes, features.dim("fc")
        if not len(features):
            raise SvmError(f"{features.paths[0].parent}: the feature cache holds no images")
        scaling = feature_scale(features, "fc", params.target_norm, params.seed, params.norm_sample, NORM_IMAGES)
        scale = scaling.scale
        positives = collect_positives(features, scale, len(classes))
        inputs = {p.as_posix(): file_digest(p) for p in features.paths}
    trainable = [c for c in range(len(classes)) if len(positives[c])]
    workers = min(len(trainable), max(1, num_workers or os.cpu_count() or 1))
    tasks = [
        MiningTask(recipe, train_split, num_shards, params, scale, tuple(trainable[g::workers]),
                   tuple(positives[c] for c in trainable[g::workers]), g)
        for g in range(workers)
    ]
    results = _mine_all(tasks) + [
        ClassResult(c, "no_positives", np.zeros(dim, np.float32), NEVER_BIAS, 0)
        for c in range(len(classes)) if c not in trainable
    ]
    results.sort(key=lambda r: r.index)
    _warn_untrained(classes, results)

    model = SvmModel(np.stack([r.weights for r in results]) if results else np.zeros((0, dim), np.float32),
                     np.array([r.bias for r in results], np.float32), scale, classes)
    model.save(out_path, {
        "recipe": recipe,
        "split": train_split,
        "params": {"svm": as_dict(params)},
        "code_version": code_version("svm"),
        "inputs": inputs,
    })
    report = {
        "recipe": recipe,
        "split": train_split,
        "mining": params.mining,
        "mean_norm": scaling.mean_norm,
        "feature_scale": scale,
        "norm_sample_rows": scaling.rows,
        "classes": {classes[r.index]: r.report() for r in results},
    }
    runs.record(out_path, {"seconds": time.perf_counter() - start, **_take_seconds(report["classes"])})
    write_text(report_path, json.dumps(report, indent=2) + "\n")


def _take_seconds(class_reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Move the run-to-run seconds out of the per-class reports (DVC metrics) into a run record."""
    return {"classes": {name: {"seconds": c.pop("seconds"), "rounds": [r.pop("seconds") for r in c["rounds"]]}
                        for name, c in class_reports.items()}}
