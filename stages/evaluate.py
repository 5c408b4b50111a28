"""Stage ``evaluate``: PASCAL VOC average precision of one recipe's test detections.

Matching follows the devkit's ``VOCevaldet``. Per class, the detections of all
images are taken in descending score (a stable sort: equal scores keep file
order). Each is compared with every ground-truth box of its class in its image;
the box of highest IoU (the first on ties) is its match if that IoU is at least
``evaluate.iou`` (``>=``, as the devkit). A match with a ``difficult`` box is
ignored (neither true nor false positive); a match with a box an earlier
detection already took is a false positive (duplicate), as is a detection
without a match; otherwise it is a true positive and takes the box. Note the
devkit's rule: the best box is chosen among all boxes, taken or not, so a
detection whose best box is taken is a duplicate even if another free box
overlaps it enough. The positives of a class are its non-difficult boxes.

IoU is continuous (:func:`stages.ops.boxes.box_iou`): our ``x2 - x1`` is the
devkit's ``x2 - x1 + 1`` on its 1-based inclusive pixels, so the two agree.
Ignored detections are left out of the precision/recall sequence; in the
devkit they repeat the previous point (or make a ``0/0`` one at the start,
which its ``max`` skips), which changes neither AP.

AP: VOC2007 is the mean over ``t = 0, 0.1, ..., 1`` of the highest precision at
recall ``>= t`` (0 if the class never reaches ``t``), with the thresholds exactly
as the reference tools make them (the devkit's ``0:0.1:1``, py-faster-rcnn's
``np.arange(0., 1.1, 0.1)``): the fourth is 0.30000000000000004, so a recall
of exactly 3/10 does not reach it, and scores equal the published tools'. VOC2010+ is the area under the monotone precision envelope over all
points, recall 0 and 1 appended as the devkit's ``VOCap``. A class with
ground truth but no detection has AP 0. A class with no non-difficult ground
truth in the split has no defined AP: it is reported as ``null``, listed under
``no_ground_truth``, left out of both mAPs and of the PR CSV, and noted on
stderr.

Outputs:

- metrics JSON (DVC metrics): ``recipe``, ``mAP_voc07``, ``mAP_voc2010``,
  ``AP_voc07`` and ``AP_voc2010`` (``{class: AP}``), ``num_detections``
  (all classes), ``num_positives`` (``{class: n}``), ``no_ground_truth``
  (list of classes), and ``coco``: pycocotools' box metrics of the COCO
  results against the ``coco_gt`` stage's ground truth
  (:func:`stages.data.coco.bbox_metrics`): ``AP`` (AP@[.5:.95]), ``AP50``,
  ``AP75``, ``APs``, ``APm``, ``APl`` (areas below 32², up to 96², above) and
  ``AR100``, ``null`` where pycocotools has no ground truth to measure (-1),
  0 without any detection; values rounded to 4 decimals. The log shows the
  AP table and one line of the COCO metrics, not pycocotools' own output.
- PR CSV (DVC plots): ``recall,<class>,...`` with the envelope precision at
  recall ``0.00, 0.01, ..., 1.00`` (0 beyond the class's highest recall).
- figures folder: ``pr.png`` (every class's precision-recall curve, APs in the
  legend) and ``gallery/<image_id>.png`` for the first ``evaluate.gallery``
  test images: ground truth in green (difficult dashed), detections scoring at
  least ``evaluate.gallery_score`` in red with class and score.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from cycler import cycler  # noqa: E402
from tqdm import tqdm  # noqa: E402

from stages.core.atomic import atomic_dir, write_text  # noqa: E402
from stages.core.config import EvaluateParams  # noqa: E402
from stages.core.layout import index_file  # noqa: E402
from stages.core.store import ArtifactError, PerImageReader  # noqa: E402
from stages.data import coco  # noqa: E402
from stages.data.detections import read_score_kind  # noqa: E402
from stages.data.images import load_image  # noqa: E402
from stages.ops.boxes import box_iou  # noqa: E402
from stages.tools.drawing import draw_detections, draw_ground_truth, image_axes, save  # noqa: E402

TP, FP, IGNORED = 1, 0, -1  # outcome of one detection
DETECTION_ROWS = ("boxes", "scores", "labels")
PR_POINTS = np.arange(101) / 100  # recall grid of the PR CSV
VOC07_POINTS = np.arange(0.0, 1.1, 0.1)  # the reference tools' thresholds, float rounding included
DECIMALS = 4


class ImageResult(NamedTuple):
    """One image's ground truth (``G`` boxes) and detections (``K`` boxes); labels are class indices."""

    gt_boxes: np.ndarray  # (G, 4) float32
    gt_labels: np.ndarray  # (G,) int
    gt_difficult: np.ndarray  # (G,) bool
    boxes: np.ndarray  # (K, 4) float32
    scores: np.ndarray  # (K,) float32
    labels: np.ndarray  # (K,) int


@dataclass(frozen=True)
class Curve:
    """A class's precision/recall after each counted (not ignored) detection, in descending score."""

    recall: np.ndarray  # (D,) float64, non-decreasing; all 0 when num_positives == 0
    precision: np.ndarray  # (D,) float64
    num_positives: int  # non-difficult ground-truth boxes
    num_detections: int  # all detections of the class, ignored ones included


# --- matching ------------------------------------------------------------------------------------


def match_image(image: ImageResult, iou: float) -> np.ndarray:
    """``(K,)`` int8 outcome of each detection of one image: :data:`TP`, :data:`FP` or :data:`IGNORED`."""
    outcome = np.full(len(image.scores), FP, np.int8)
    threshold = np.float32(iou)  # IoUs are float32: an IoU of exactly 0.7 must pass a threshold of 0.7
    for c in np.unique(image.labels):
        dets = np.flatnonzero(image.labels == c)
        dets = dets[np.argsort(-image.scores[dets], kind="stable")]
        gts = np.flatnonzero(image.gt_labels == c)
        if len(gts) == 0:
            continue
        overlaps = box_iou(image.boxes[dets], image.gt_boxes[gts])
        best = overlaps.argmax(axis=1)
        taken = np.zeros(len(gts), bool)
        for d, j, overlap in zip(dets, best, overlaps[np.arange(len(dets)), best]):
            if overlap < threshold:
                continue
            if image.gt_difficult[gts[j]]:
                outcome[d] = IGNORED
            elif not taken[j]:
                outcome[d], taken[j] = TP, True
    return outcome


def pr_curve(scores: np.ndarray, outcomes: np.ndarray, num_positives: int) -> tuple[np.ndarray, np.ndarray]:
    """``(D,)`` scores and outcomes of one class over all images -> cumulative ``(recall, precision)``."""
    ranked = outcomes[np.argsort(-scores, kind="stable")]
    ranked = ranked[ranked != IGNORED]
    tp = np.cumsum(ranked == TP)
    fp = np.cumsum(ranked == FP)
    return tp / max(num_positives, 1), tp / np.maximum(tp + fp, 1)


def match_detections(images: Iterable[ImageResult], num_classes: int, iou: float) -> list[Curve]:
    """Match every image's detections to its ground truth; one :class:`Curve` per class."""
    scores, labels, outcomes = [], [], []
    positives = np.zeros(num_classes, np.int64)
    for image in images:
        scores.append(image.scores)
        labels.append(image.labels)
        outcomes.append(match_image(image, iou))
        positives += np.bincount(image.gt_labels[~image.gt_difficult], minlength=num_classes)
    scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    labels = np.concatenate(labels) if labels else np.zeros(0, np.int32)
    outcomes = np.concatenate(outcomes) if outcomes else np.zeros(0, np.int8)
    curves = []
    for c in range(num_classes):
        mine = labels == c
        recall, precision = pr_curve(scores[mine], outcomes[mine], int(positives[c]))
        curves.append(Curve(recall, precision, int(positives[c]), int(mine.sum())))
    return curves


# --- average precision ---------------------------------------------------------------------------


def interpolated_precision(recall: np.ndarray, precision: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``(D,)``, ``(D,)``, ``(T,)`` -> ``(T,)`` highest precision at recall ``>= t`` for each ``t``; 0 if none."""
    envelope = np.append(np.maximum.accumulate(precision[::-1])[::-1], 0.0)
    return envelope[np.searchsorted(recall, points, side="left")]


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07: bool) -> float:
    """Average precision of a ``(D,)`` recall/precision sequence (recall non-decreasing).

    ``use_07``: the VOC2007 11-point interpolated AP; else the VOC2010+ area
    under the monotone precision envelope (the devkit's ``VOCap``).
    """
    if use_07:
        return float(interpolated_precision(recall, precision, VOC07_POINTS).mean())
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.maximum.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]
    return float(np.sum(np.diff(mrec) * mpre[1:]))  # the devkit sums over recall changes only: same value


# --- reports -------------------------------------------------------------------------------------


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), DECIMALS)


def summarize(curves: Sequence[Curve], classes: Sequence[str], recipe: str) -> dict:
    """The metrics JSON as a dict (see the module docstring); AP ``None`` for classes without positives."""
    ap = {
        name: {
            cls: voc_ap(c.recall, c.precision, use_07) if c.num_positives else None for cls, c in zip(classes, curves)
        }
        for name, use_07 in (("voc07", True), ("voc2010", False))
    }
    means = {name: [v for v in values.values() if v is not None] for name, values in ap.items()}
    return {
        "recipe": recipe,
        **{f"mAP_{name}": _rounded(np.mean(v)) if v else None for name, v in means.items()},
        **{f"AP_{name}": {cls: _rounded(v) for cls, v in values.items()} for name, values in ap.items()},
        "num_detections": sum(c.num_detections for c in curves),
        "num_positives": {cls: c.num_positives for cls, c in zip(classes, curves)},
        "no_ground_truth": [cls for cls, c in zip(classes, curves) if not c.num_positives],
    }


def pr_table(curves: Sequence[Curve], classes: Sequence[str]) -> str:
    """The PR CSV: ``recall`` and each class with positives, envelope precision on :data:`PR_POINTS`."""
    kept = [(cls, c) for cls, c in zip(classes, curves) if c.num_positives]
    columns = [PR_POINTS] + [interpolated_precision(c.recall, c.precision, PR_POINTS) for _, c in kept]
    lines = [",".join(["recall"] + [cls for cls, _ in kept])]
    lines += [",".join(f"{v:.{DECIMALS}f}" for v in row) for row in zip(*columns)]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.4f}"


def ap_table(metrics: dict) -> str:
    """Per-class AP as a fixed-width text table, mAP last."""
    width = max(len("class"), *(len(cls) for cls in metrics["num_positives"]))
    lines = [f"{'class':<{width}}  {'VOC07':>6}  {'VOC2010':>7}  {'positives':>9}"]
    for cls, positives in metrics["num_positives"].items():
        ap07, ap2010 = metrics["AP_voc07"][cls], metrics["AP_voc2010"][cls]
        lines.append(f"{cls:<{width}}  {_fmt(ap07):>6}  {_fmt(ap2010):>7}  {positives:9d}")
    lines.append(f"{'mAP':<{width}}  {_fmt(metrics['mAP_voc07']):>6}  {_fmt(metrics['mAP_voc2010']):>7}")
    return "\n".join(lines)


def coco_line(metrics: dict) -> str:
    """The COCO metrics on one line of the log."""
    return "COCO (pycocotools): " + "  ".join(f"{name} {_fmt(value).strip()}" for name, value in metrics["coco"].items())


# --- figures -------------------------------------------------------------------------------------


def plot_pr(curves: Sequence[Curve], classes: Sequence[str], metrics: dict, path: Path) -> None:
    """Every class with positives: precision against recall, its APs in the legend."""
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    ax.set_prop_cycle(cycler(linestyle=["-", "--"]) * cycler(color=plt.cm.tab10.colors))  # 20 distinct curves
    for cls, curve in zip(classes, curves):
        if curve.num_positives:
            label = f"{cls}: AP {metrics['AP_voc2010'][cls]:.3f} (VOC07 {metrics['AP_voc07'][cls]:.3f})"
            ax.plot(curve.recall, curve.precision, label=label, linewidth=1.2)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
    ax.set_title(f"{metrics['recipe']}: mAP {metrics['mAP_voc2010']} (VOC07 {metrics['mAP_voc07']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def draw_image(image: np.ndarray, result: ImageResult, classes: Sequence[str], title: str, path: Path) -> None:
    """Ground truth in green (difficult dashed, name above), detections in red (name and score below)."""
    fig, ax = image_axes(image)
    draw_ground_truth(ax, result.gt_boxes, result.gt_labels, result.gt_difficult, classes)
    draw_detections(ax, result.boxes, result.scores, result.labels, classes)
    save(fig, path, title)


# --- the stage -----------------------------------------------------------------------------------


def _check_detections(detections: PerImageReader, index: PerImageReader, recipe: str, split: str) -> None:
    """Raise :class:`ArtifactError` unless the detections are this recipe's, on the index's images and classes."""
    path = detections.paths[0]
    missing = sorted(set(DETECTION_ROWS) - set(json.loads(detections.attrs.get("row_datasets", "[]"))))
    if missing:
        raise ArtifactError(f"{path}: no {missing} datasets; not a detections file (rerun the detect stage)")
    for name, expected in (("recipe", recipe), ("split", split)):
        if detections.attrs.get(name) != expected:
            raise ArtifactError(f"{path}: detections of {name} {detections.attrs.get(name)!r}, expected {expected!r}")
    if detections.json_attr("classes") != index.json_attr("classes"):
        raise ArtifactError(
            f"{path}: classes {detections.json_attr('classes')} differ from {index_file(split)}'s "
            f"{index.json_attr('classes')} (stale artifact; rerun the detect stage)"
        )
    detections.require_images_of(index)
    read_score_kind(detections)


def _read(index: PerImageReader, detections: PerImageReader, i: int) -> ImageResult:
    return ImageResult(
        *(index.rows(name, i) for name in ("gt_boxes", "gt_labels", "gt_difficult")),
        *(detections.rows(name, i) for name in DETECTION_ROWS),
    )


def _all_images(index: PerImageReader, detections: PerImageReader, num_classes: int) -> Iterator[ImageResult]:
    """Every image in index order; raise :class:`ArtifactError` on a detection label that is no class."""
    for i in tqdm(range(len(index)), desc="evaluate: matching detections", unit="img"):
        result = _read(index, detections, i)
        if len(result.labels) and not 0 <= result.labels.min() <= result.labels.max() < num_classes:
            raise ArtifactError(
                f"{detections.paths[0]}: image {index.image_ids[i]!r} has labels outside 0..{num_classes - 1}"
            )
        yield result


def coco_summary(index: PerImageReader, results_path: Path, ground_truth_path: Path) -> dict[str, float | None]:
    """pycocotools' box metrics (:func:`stages.data.coco.bbox_metrics`), rounded, after checking both files'
    image ids against the index; raise :class:`ArtifactError` on a mismatch."""
    ground_truth, results = json.loads(ground_truth_path.read_text()), json.loads(results_path.read_text())
    coco.check_ground_truth(ground_truth, index.image_ids, ground_truth_path)
    coco.check_results(results, index.image_ids, results_path)
    return {name: _rounded(value) for name, value in coco.bbox_metrics(ground_truth, results).items()}


def _gallery(index: PerImageReader, detections: PerImageReader, params: EvaluateParams, folder: Path) -> None:
    classes = index.json_attr("classes")
    folder.mkdir()
    lowest = params.lowest_drawn(read_score_kind(detections))
    for i in range(min(params.gallery, len(index))):
        result = _read(index, detections, i)
        shown = result.scores >= lowest
        result = result._replace(boxes=result.boxes[shown], scores=result.scores[shown], labels=result.labels[shown])
        image = load_image(Path(index.attrs["data_root"]) / index.value("paths", i))
        title = (f"{index.image_ids[i]}: {len(result.gt_boxes)} ground-truth boxes, "
                 f"{shown.sum()} detections scoring >= {lowest:g}")
        draw_image(image, result, classes, title, folder / f"{index.image_ids[i]}.png")


def run(
    params: EvaluateParams,
    recipe: str,
    test_split: str,
    detections_path: Path,
    coco_results_path: Path,
    coco_gt_path: Path,
    metrics_path: Path,
    pr_path: Path,
    figures_dir: Path,
) -> None:
    """Evaluate ``detections_path`` against the ``test_split`` index and ``coco_results_path`` against
    ``coco_gt_path``; write metrics, PR CSV and figures."""
    with PerImageReader([index_file(test_split)]) as index, PerImageReader([detections_path]) as detections:
        _check_detections(detections, index, recipe, test_split)
        classes = index.json_attr("classes")
        curves = match_detections(_all_images(index, detections, len(classes)), len(classes), params.iou)
        metrics = {**summarize(curves, classes, recipe), "coco": coco_summary(index, coco_results_path, coco_gt_path)}
        write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
        write_text(pr_path, pr_table(curves, classes))
        with atomic_dir(figures_dir) as folder:
            plot_pr(curves, classes, metrics, folder / "pr.png")
            _gallery(index, detections, params, folder / "gallery")
    for cls in metrics["no_ground_truth"]:
        print(f"note: class {cls!r} has no non-difficult ground truth in {test_split}: AP undefined (null), "
              "left out of the mAP", file=sys.stderr)
    print(ap_table(metrics))
    print(coco_line(metrics))
