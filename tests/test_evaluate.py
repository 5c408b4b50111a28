from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from stages import coco_gt, evaluate
from stages.core import layout
from stages.core.store import ArtifactError, PerImageReader, RowSpec, create_per_image
from stages.data import coco
from stages.evaluate import FP, IGNORED, TP, ImageResult, match_detections, match_image, summarize, voc_ap


def image(gt=(), gt_labels=None, difficult=None, boxes=(), scores=(), labels=None) -> ImageResult:
    """An :class:`ImageResult`; labels default to class 0, difficult to False."""
    gt, boxes = np.asarray(gt, np.float32).reshape(-1, 4), np.asarray(boxes, np.float32).reshape(-1, 4)
    return ImageResult(
        gt,
        np.zeros(len(gt), np.int32) if gt_labels is None else np.asarray(gt_labels, np.int32),
        np.zeros(len(gt), bool) if difficult is None else np.asarray(difficult, bool),
        boxes,
        np.asarray(scores, np.float32),
        np.zeros(len(boxes), np.int32) if labels is None else np.asarray(labels, np.int32),
    )


def aps(curve) -> tuple[float, float]:
    return voc_ap(curve.recall, curve.precision, True), voc_ap(curve.recall, curve.precision, False)


A, B, C = [0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]
FAR = [100, 100, 110, 110]


# --- AP by hand ----------------------------------------------------------------------------------


def test_perfect_detector_has_ap_one():
    results = [image([A, B], boxes=[A, B], scores=[0.9, 0.8]), image([C], boxes=[C], scores=[0.1])]
    (curve,) = match_detections(results, 1, 0.5)
    assert curve.num_positives == 3 and curve.recall.tolist() == [1 / 3, 2 / 3, 1.0]
    assert aps(curve) == (pytest.approx(1.0), pytest.approx(1.0))


def test_tp_fp_tp_with_three_positives_by_hand():
    # Ranked: TP, FP, TP over 3 positives -> recall 1/3, 1/3, 2/3; precision 1, 1/2, 2/3.
    (curve,) = match_detections([image([A, B, C], boxes=[A, FAR, B], scores=[0.9, 0.8, 0.7])], 1, 0.5)
    np.testing.assert_allclose(curve.recall, [1 / 3, 1 / 3, 2 / 3])
    np.testing.assert_allclose(curve.precision, [1, 1 / 2, 2 / 3])
    # VOC07: t = 0, .1, .2, .3 -> 1 (recall 1/3 >= .3); t = .4, .5, .6 -> 2/3; t = .7 ... 1 -> 0: (4 + 3 * 2/3) / 11.
    # VOC2010: envelope 1 on (0, 1/3], 2/3 on (1/3, 2/3], 0 beyond: 1/3 + 2/9.
    assert aps(curve) == (pytest.approx(6 / 11), pytest.approx(5 / 9))


def test_voc_ap_interpolates_over_later_higher_precision():
    # Precision rises from 1/2 to 2/3 later: the envelope takes 2/3 back to recall 1/4.
    recall, precision = np.array([0.25, 0.25, 0.5]), np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(recall, precision, False) == pytest.approx(0.25 * 1 + 0.25 * 2 / 3)
    # t = 0 .. 0.2 -> 1; t = .3 .. .5 -> 2/3; t = .6 .. 1 -> 0.
    assert voc_ap(recall, precision, True) == pytest.approx((3 + 3 * 2 / 3) / 11)


def test_voc07_threshold_of_exactly_three_tenths_is_missed_as_by_the_reference_tools():
    # 3 of 10 positives found by the first detection: recall 3/10 is below the tools' 0.30000000000000004,
    # so only t = 0, 0.1, 0.2 see precision 1 (3 thresholds of 11, not 4).
    assert voc_ap(np.array([3 / 10]), np.array([1.0]), True) == pytest.approx(3 / 11)


def reference_voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC07 11-point AP written the way the devkit and py-faster-rcnn's voc_eval compute it: a loop over
    ``np.arange(0., 1.1, 0.1)``, the largest precision at recall >= t, each point weighted 1/11."""
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        reached = recall >= t
        ap += (np.max(precision[reached]) if reached.any() else 0.0) / 11.0
    return ap


def random_curve(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision of random detection outcomes; with 10 or 20 positives many recalls are exact tenths."""
    rng = np.random.default_rng(seed)
    positives = int(rng.choice([10, 20, 7, 13]))
    hits = rng.random(int(rng.integers(1, 40))) < rng.uniform(0.2, 0.9)
    tp = np.minimum(np.cumsum(hits), positives)
    return tp / positives, tp / np.arange(1, len(hits) + 1)


@pytest.mark.parametrize("seed", range(40))
def test_voc07_equals_the_reference_on_random_cases(seed):
    recall, precision = random_curve(seed)
    assert voc_ap(recall, precision, True) == pytest.approx(reference_voc07_ap(recall, precision), abs=1e-12)


def test_random_cases_do_land_on_three_tenths():
    """The case where exact tenths and the reference tools differ is among the random ones."""
    assert sum(bool(np.any(random_curve(seed)[0] == 3 / 10)) for seed in range(40)) >= 3


def test_class_with_ground_truth_but_no_detections_has_ap_zero():
    (curve,) = match_detections([image([A])], 1, 0.5)
    assert curve.num_positives == 1 and len(curve.recall) == 0
    assert aps(curve) == (0.0, 0.0)


# --- matching ------------------------------------------------------------------------------------


def test_detection_on_difficult_box_is_ignored_and_not_a_positive():
    # The higher-scoring detection hits the difficult box B: without ignoring it, precision would start at 0.
    result = image([A, B], difficult=[False, True], boxes=[B, A], scores=[0.9, 0.8])
    assert match_image(result, 0.5).tolist() == [IGNORED, TP]
    (curve,) = match_detections([result], 1, 0.5)
    assert curve.num_positives == 1 and curve.num_detections == 2
    assert curve.recall.tolist() == [1.0] and curve.precision.tolist() == [1.0]


def test_second_detection_of_a_box_is_a_duplicate():
    result = image([A], boxes=[[0, 0, 10, 9], A], scores=[0.5, 0.9])
    assert match_image(result, 0.5).tolist() == [FP, TP]  # the higher score takes the box
    (curve,) = match_detections([result], 1, 0.5)
    assert curve.precision.tolist() == [1.0, 0.5]


def test_best_box_taken_is_a_duplicate_even_if_another_box_overlaps_enough():
    # As the devkit: the best box is chosen among all boxes, taken or not. The second detection's best
    # box is A (IoU 100/105, taken by the first), though `other` (IoU 105/120 = 0.875) is free.
    other = [0, 0, 10, 12]
    result = image([A, other], boxes=[A, [0, 0, 10, 10.5]], scores=[0.9, 0.8])
    assert match_image(result, 0.5).tolist() == [TP, FP]


def test_iou_exactly_at_the_threshold_matches():
    half = image([A], boxes=[[0, 0, 10, 5]], scores=[1])  # IoU 50/100 = 0.5
    assert match_image(half, 0.5).tolist() == [TP]
    seven = image([A], boxes=[[0, 0, 10, 7]], scores=[1])  # IoU 0.7, not a binary fraction
    assert match_image(seven, 0.7).tolist() == [TP]
    assert match_image(image([A], boxes=[[0, 0, 10, 6.9]], scores=[1]), 0.7).tolist() == [FP]


def test_detections_without_ground_truth_of_their_class_are_false_positives():
    empty = image(boxes=[A], scores=[0.9])  # an image without any ground truth
    other_class = image([A], gt_labels=[1], boxes=[A], scores=[0.8], labels=[0])
    assert match_image(empty, 0.5).tolist() == [FP] and match_image(other_class, 0.5).tolist() == [FP]
    hit = image([B], boxes=[B], scores=[0.7])
    (curve, _) = match_detections([empty, other_class, hit], 2, 0.5)
    assert curve.precision.tolist() == pytest.approx([0, 0, 1 / 3]) and curve.recall.tolist() == [0, 0, 1]


def test_equal_scores_keep_input_order():
    # Equal scores: the false positive (first in file order) ranks before the true positive, and back.
    fp, tp = image([A], boxes=[FAR], scores=[0.5]), image([B], boxes=[B], scores=[0.5])
    assert match_detections([fp, tp], 1, 0.5)[0].precision.tolist() == [0.0, 0.5]
    assert match_detections([tp, fp], 1, 0.5)[0].precision.tolist() == [1.0, 0.5]
    # Within an image too: of equal-scoring copies of one box, the first in file order takes it.
    scores = np.random.default_rng(1).integers(0, 3, 60) / 2  # many ties: an unstable sort would reorder them
    expected = [TP if i == np.flatnonzero(scores == 1)[0] else FP for i in range(60)]
    assert match_image(image([A], boxes=[A] * 60, scores=scores), 0.5).tolist() == expected


def test_class_without_ground_truth_is_left_out_of_the_map():
    results = [image([A], gt_labels=[0], boxes=[A, B], scores=[0.9, 0.8], labels=[0, 2]),
               image([C], gt_labels=[2], difficult=[True])]  # class 2: only a difficult box; class 1: nothing
    metrics = summarize(match_detections(results, 3, 0.5), ["a", "b", "c"], "rcnn")
    assert metrics["AP_voc07"] == {"a": 1.0, "b": None, "c": None}
    assert metrics["AP_voc2010"] == {"a": 1.0, "b": None, "c": None}
    assert metrics["mAP_voc07"] == 1.0 and metrics["mAP_voc2010"] == 1.0
    assert metrics["no_ground_truth"] == ["b", "c"] and metrics["num_positives"] == {"a": 1, "b": 0, "c": 0}
    assert metrics["num_detections"] == 2
    assert evaluate.pr_table(match_detections(results, 3, 0.5), ["a", "b", "c"]).splitlines()[0] == "recall,a"


def test_map_is_the_mean_over_classes_with_ground_truth():
    results = [image([A, B], gt_labels=[0, 1], boxes=[A], scores=[0.9], labels=[0])]  # class b: AP 0
    metrics = summarize(match_detections(results, 2, 0.5), ["a", "b"], "x")
    assert metrics["AP_voc2010"] == {"a": 1.0, "b": 0.0} and metrics["mAP_voc2010"] == 0.5


# --- agreement with the devkit on random cases ---------------------------------------------------


def devkit_ap(results: list[ImageResult], cls: int, iou: float) -> tuple[float, float]:
    """The devkit's VOCevaldet loop, VOC07 11-point AP and VOCap, written out independently (float64 IoU)."""
    gt = [(r.gt_boxes[r.gt_labels == cls].astype(float), r.gt_difficult[r.gt_labels == cls]) for r in results]
    taken = [np.zeros(len(b), bool) for b, _ in gt]
    npos = sum(int((~d).sum()) for _, d in gt)
    dets = [
        (float(s), i, b.astype(float))
        for i, r in enumerate(results)
        for b, s, l in zip(r.boxes, r.scores, r.labels)
        if l == cls
    ]
    dets = sorted(dets, key=lambda d: -d[0])  # Python's sort is stable, as MATLAB's
    tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
    for d, (_, i, bb) in enumerate(dets):
        ovmax, jmax = -np.inf, -1
        for j, g in enumerate(gt[i][0]):
            iw, ih = min(bb[2], g[2]) - max(bb[0], g[0]), min(bb[3], g[3]) - max(bb[1], g[1])
            if iw > 0 and ih > 0:
                ov = iw * ih / ((bb[2] - bb[0]) * (bb[3] - bb[1]) + (g[2] - g[0]) * (g[3] - g[1]) - iw * ih)
                if ov > ovmax:
                    ovmax, jmax = ov, j
        if ovmax >= iou:
            if not gt[i][1][jmax]:
                if not taken[i][jmax]:
                    tp[d], taken[i][jmax] = 1, True
                else:
                    fp[d] = 1
        else:
            fp[d] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / npos
    with np.errstate(invalid="ignore"):
        prec = tp / (fp + tp)  # 0/0 = NaN at leading ignored detections; MATLAB's max skips NaN
    ap07 = 0.0
    for t in np.arange(0.0, 1.1, 0.1):  # MATLAB's 0:0.1:1, whose fourth value is 0.30000000000000004
        p = prec[(rec >= t) & ~np.isnan(prec)]
        ap07 += (p.max() if len(p) else 0.0) / 11
    mrec, mpre = [0.0, *rec, 1.0], [0.0, *prec, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = mpre[i + 1] if np.isnan(mpre[i]) else max(mpre[i], mpre[i + 1])
    ap = sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])
    return ap07, ap


def random_results(rng: np.random.Generator, num_images: int, num_classes: int) -> list[ImageResult]:
    """Boxes on an integer grid (many equal IoUs and scores), detections near the ground truth or anywhere."""
    results = []
    for _ in range(num_images):
        g = int(rng.integers(0, 5))
        corner, size = rng.integers(0, 16, (g, 2)), rng.integers(3, 9, (g, 2))
        gt = np.hstack([corner, corner + size]).astype(np.float32)
        near = gt[rng.integers(0, g, int(rng.integers(0, 7)))] if g else np.zeros((0, 4), np.float32)
        near = near + rng.integers(-1, 2, near.shape)
        corner = rng.integers(0, 16, (int(rng.integers(0, 4)), 2))
        anywhere = np.hstack([corner, corner + rng.integers(3, 9, corner.shape)])
        boxes = np.vstack([near, anywhere]).astype(np.float32)
        results.append(image(gt, rng.integers(0, num_classes, g), rng.random(g) < 0.25, boxes,
                             rng.integers(0, 5, len(boxes)) / 4, rng.integers(0, num_classes, len(boxes))))
    return results


@pytest.mark.parametrize("iou", [0.5, 0.3])
def test_agrees_with_the_devkit_on_random_cases(iou):
    outcomes = []
    for seed in range(25):
        results = random_results(np.random.default_rng(seed), 12, 3)
        outcomes += [match_image(r, iou) for r in results]
        for cls, curve in enumerate(match_detections(results, 3, iou)):
            if curve.num_positives:
                assert aps(curve) == pytest.approx(devkit_ap(results, cls, iou), abs=1e-12), (seed, cls)
    outcomes = np.concatenate(outcomes)
    assert min((outcomes == TP).sum(), (outcomes == FP).sum(), (outcomes == IGNORED).sum()) > 20  # every branch ran


# --- the stage -----------------------------------------------------------------------------------

DETECTION_SPECS = {
    "boxes": RowSpec((4,), np.float32),
    "scores": RowSpec((), np.float32),
    "labels": RowSpec((), np.int32),
}
FP_BOX = np.array([[0, 0, 3, 3]], np.float32)  # IoU < 0.1 with any object of the tiny dataset


def perfect_detections(gt: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Every ground-truth box as a detection (score 0.9) plus one false positive (0.1)."""
    return {"boxes": np.vstack([gt, FP_BOX]), "scores": np.r_[np.full(len(gt), 0.9), 0.1].astype(np.float32),
            "labels": np.r_[labels, 0].astype(np.int32)}


def no_detections(gt: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    return {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32), "labels": np.zeros(0, np.int32)}


def write_detections(workspace, split: str, recipe: str = "rcnn", classes=None, drop_last: bool = False,
                     detector=perfect_detections, scores: str | None = "svm") -> int:
    """The inputs of the stage: the detections of ``detector`` on every image (.h5 and COCO results, numbered as
    the detect stage numbers them) and the coco_gt stage's ground truth; returns the number of detections."""
    h5, results, gt = inputs(workspace)
    coco_gt.run(layout.index_file(split), gt)
    entries = []
    with PerImageReader([layout.index_file(split)]) as index:
        attrs = {"classes": classes or index.json_attr("classes"), "recipe": recipe, "split": split}
        if scores is not None:
            attrs["scores"] = scores
        with create_per_image(h5, DETECTION_SPECS, attrs) as writer:
            for i, image_id in enumerate(index.image_ids[: len(index) - drop_last]):
                found = detector(index.rows("gt_boxes", i), index.rows("gt_labels", i))
                writer.append(image_id, found)
                entries += coco.result_entries(i, image_id, found, index.json_attr("classes"))
    results.write_text(json.dumps(entries))
    return len(entries)


def inputs(workspace):
    """Detections (.h5), COCO results, COCO ground truth."""
    return workspace / "detections.h5", workspace / "detections.json", workspace / "gt.json"


def outputs(workspace):
    return workspace / "map.json", workspace / "pr.csv", workspace / "figures"


def evaluate_run(workspace, params, split: str) -> None:
    evaluate.run(params, "rcnn", split, *inputs(workspace), *outputs(workspace))


def test_run_writes_metrics_curve_and_figures(workspace, tiny_config, capsys):
    split = tiny_config.data.test_split
    count = write_detections(workspace, split)
    metrics_path, pr_path, figures = outputs(workspace)
    params = tiny_config.evaluate
    evaluate_run(workspace, params, split)

    with PerImageReader([layout.index_file(split)]) as index:
        classes, ids = index.json_attr("classes"), index.image_ids
        positives = {c: 0 for c in classes}
        for i in range(len(index)):
            for label, hard in zip(index.rows("gt_labels", i), index.rows("gt_difficult", i)):
                positives[classes[label]] += int(not hard)
    with_gt = [c for c in classes if positives[c]]
    metrics = json.loads(metrics_path.read_text())
    assert metrics["recipe"] == "rcnn" and metrics["num_detections"] == count
    assert metrics["num_positives"] == positives and len(with_gt) >= 2
    # Every box found before any false positive: AP 1 for every class with positives.
    assert metrics["AP_voc2010"] == {c: 1.0 if positives[c] else None for c in classes}
    assert metrics["mAP_voc07"] == metrics["mAP_voc2010"] == 1.0
    lines = pr_path.read_text().splitlines()
    assert lines[0] == ",".join(["recall", *with_gt]) and len(lines) == 102
    assert lines[1].startswith("0.0000,") and lines[-1] == ",".join(["1.0000"] * (len(with_gt) + 1))
    assert 0 < params.gallery < len(ids)  # the gallery is the first images only
    assert sorted(p.name for p in (figures / "gallery").iterdir()) == [f"{i}.png" for i in ids[: params.gallery]]
    drawn = np.asarray(Image.open(figures / "gallery" / f"{ids[0]}.png").convert("RGB")).astype(int)
    red = (drawn[..., 0] > 200) & (drawn[..., 1] < 60) & (drawn[..., 2] < 60)
    assert red.sum() > 100 and (figures / "pr.png").stat().st_size > 1000
    # pycocotools on the same detections: every box found first, AP@[.5:.95] 1 (difficult boxes are crowd, ignored);
    # objects of at most 64 px (max_object_size) are never large (> 96²): APl null
    assert metrics["coco"] == {name: 1.0 if name != "APl" else None for name in coco.METRICS}
    log = capsys.readouterr().out
    assert "mAP" in log and "COCO (pycocotools): AP 1.0000  AP50 1.0000" in log and "APl n/a" in log
    assert "Average Precision" not in log and "DONE" not in log  # pycocotools' own output is not in the log

    written = (metrics_path, pr_path, figures / "pr.png", figures / "gallery" / f"{ids[0]}.png")
    before = [p.read_bytes() for p in written]
    evaluate_run(workspace, params, split)
    assert [p.read_bytes() for p in written] == before  # same inputs, byte-identical outputs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"drop_last": True}, "images differ"),
        ({"classes": ["x", "y"]}, "classes"),
        ({"recipe": "sppnet"}, "recipe 'sppnet', expected 'rcnn'"),
        ({"scores": None}, "scores attribute None"),
        ({"scores": "margin"}, "scores attribute 'margin'"),
    ],
)
def test_run_rejects_detections_of_other_images_classes_or_recipes(workspace, tiny_config, kwargs, message):
    split = tiny_config.data.test_split
    write_detections(workspace, split, **kwargs)
    with pytest.raises(ArtifactError, match=message):
        evaluate_run(workspace, tiny_config.evaluate, split)
    assert not any(p.exists() for p in outputs(workspace))


@pytest.mark.parametrize("scores, drawn", [("svm", [0.1, 0.9]), ("probability", [0.9])])
def test_gallery_draws_from_the_lowest_score_of_the_detections_kind(workspace, tiny_config, monkeypatch, scores,
                                                                      drawn):
    """gallery_score 0.0 for SVM margins draws the 0.1 false positive; gallery_probability 0.5 does not."""
    split, params = tiny_config.data.test_split, tiny_config.evaluate
    assert params.gallery_score < 0.1 < params.gallery_probability < 0.9
    write_detections(workspace, split, scores=scores)
    shown = []
    monkeypatch.setattr(evaluate, "draw_image", lambda image, result, *args: shown.append(result.scores))
    evaluate_run(workspace, params, split)
    assert len(shown) == params.gallery
    assert all(np.unique(s).tolist() == pytest.approx(drawn) for s in shown)


def test_no_detections_at_all_give_zero_ap_not_a_crash(workspace, tiny_config):
    split = tiny_config.data.test_split
    assert write_detections(workspace, split, detector=no_detections) == 0
    evaluate_run(workspace, tiny_config.evaluate, split)
    metrics = json.loads(outputs(workspace)[0].read_text())
    assert metrics["mAP_voc07"] == metrics["mAP_voc2010"] == 0.0
    assert metrics["coco"] == {name: 0.0 if name != "APl" else None for name in coco.METRICS}


@pytest.mark.parametrize("stale, message", [("results", "a result for image"), ("ground_truth", "images differ")])
def test_run_rejects_coco_files_numbered_otherwise(workspace, tiny_config, stale, message):
    split = tiny_config.data.test_split
    write_detections(workspace, split)
    _, results_path, gt_path = inputs(workspace)
    if stale == "results":  # numbered from 0
        results_path.write_text(json.dumps([{**r, "image_id": r["image_id"] - 1}
                                            for r in json.loads(results_path.read_text())]))
    else:  # the ground truth of another image order
        coco_gt.run(layout.index_file(tiny_config.data.train_split), gt_path)
    with pytest.raises(ArtifactError, match=message):
        evaluate_run(workspace, tiny_config.evaluate, split)
    assert not any(p.exists() for p in outputs(workspace))


def test_run_rejects_labels_outside_the_classes(workspace, tiny_config):
    split = tiny_config.data.test_split
    with PerImageReader([layout.index_file(split)]) as index:
        attrs = {"classes": index.json_attr("classes"), "recipe": "rcnn", "split": split, "scores": "svm"}
        with create_per_image(workspace / "detections.h5", DETECTION_SPECS, attrs) as writer:
            for image_id in index.image_ids:
                rows = {"boxes": FP_BOX, "scores": np.ones(1, np.float32), "labels": np.array([99], np.int32)}
                writer.append(image_id, rows)
    with pytest.raises(ArtifactError, match="labels outside"):
        evaluate_run(workspace, tiny_config.evaluate, split)
