"""Box regression (stage bbox): target choice, standardisation, and recovery of offsets that the features encode."""
from __future__ import annotations

import dataclasses
import json

import h5py
import numpy as np
import pytest
from helpers import write_features

from stages import bbox
from stages.bbox import fit_class, image_targets, paired_iou
from stages.core import layout
from stages.core.config import BboxParams
from stages.core.store import ArtifactError, shard_path
from stages.data.featureset import FeatureSet, class_iou, norm_sample_rows
from stages.models.box_regressor import BoxRegressor, load_bbox
from stages.ops.boxes import box_iou, decode_boxes, encode_boxes

# --- synthetic data: the pool features are a fixed linear function of each box's true offsets --------

CLASSES = ["a", "b", "c"]  # "c" never occurs
MIXING = np.random.default_rng(1).normal(size=(4, 12))
OFFSET = np.random.default_rng(2).normal(size=12)
JITTER = np.array([0.06, 0.06, 0.08, 0.08])  # std of the proposals' tx, ty, tw, th around their object


def encoded_features(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """``(M, 12)`` features that hold each box's offsets to its nearest ground truth, linearly."""
    nearest = gt[box_iou(boxes, gt).argmax(axis=1)]
    return encode_boxes(boxes, nearest) @ MIXING + OFFSET


def jittered(rng: np.random.Generator, gt: np.ndarray, per_box: int) -> np.ndarray:
    return decode_boxes(np.repeat(gt, per_box, axis=0), rng.normal(0, JITTER, size=(len(gt) * per_box, 4)))


def synthetic_image(rng: np.random.Generator, number: int) -> dict:
    """A 200x200 image with one object of class a (left half) and one of b (right half), 25 proposals each."""
    left = [rng.uniform(5, 40), rng.uniform(5, 100)]
    right = [rng.uniform(110, 140), rng.uniform(5, 100)]
    gt = np.array([left + [left[0] + rng.uniform(35, 55), left[1] + rng.uniform(35, 90)],
                   right + [right[0] + rng.uniform(35, 55), right[1] + rng.uniform(35, 90)]], np.float32)
    far = np.array([[0, 150, 20, 170], [180, 0, 199, 30]], np.float32)  # overlap nothing: never samples
    boxes = np.concatenate([jittered(rng, gt, 25), far, gt])
    labels = np.array([-1] * (len(boxes) - 2) + [0, 1], np.int32)
    return {"id": f"im{number}", "boxes": boxes, "gt_label": labels, "pool": encoded_features(boxes, gt),
            "fc": np.zeros((len(boxes), 2), np.float32), "scores": np.zeros((len(boxes), 4), np.float32),
            "size": (200, 200)}


PARAMS = BboxParams(min_iou=0.6, ridge_lambda=1.0, target_norm=20.0, norm_sample=10000, seed=0)


@pytest.fixture
def trained(workspace):
    """Regressors trained on 8 synthetic images, the images, and the model path."""
    rng = np.random.default_rng(0)
    images = [synthetic_image(rng, n) for n in range(8)]
    write_features("trainval", images, CLASSES, num_shards=2)
    out = layout.bbox_model("rcnn")
    bbox.run(PARAMS, "rcnn", "trainval", 2, out)
    return load_bbox(out), images, out


def test_recovers_the_offsets_that_the_features_encode(trained):
    model, images, out = trained
    with h5py.File(out, "r") as f:
        stats = json.loads(f.attrs["stats"])
    for name in ("a", "b"):
        assert stats[name]["iou_before"] < 0.85
        assert stats[name]["iou_after"] > 0.97
    # held-out proposals around new objects move onto them
    rng = np.random.default_rng(99)
    image = synthetic_image(rng, 99)
    gt = image["boxes"][-2:]
    for c in (0, 1):
        proposals = jittered(rng, gt[c:c + 1], 30)
        moved = model.predict(c, encoded_features(proposals, gt), proposals)
        assert moved.dtype == np.float32 and moved.shape == (30, 4)
        assert paired_iou(moved, np.repeat(gt[c:c + 1], 30, axis=0)).mean() > 0.97


def test_sample_counts_gt_rows_and_untrained_class(trained, capsys):
    model, images, out = trained
    with h5py.File(out, "r") as f:
        stats = json.loads(f.attrs["stats"])
        assert json.loads(f.attrs["classes"]) == CLASSES
        assert json.loads(f.attrs["params"]) == {"bbox": {"min_iou": 0.6, "ridge_lambda": 1.0, "target_norm": 20.0,
                                                          "norm_sample": 10000, "seed": 0}}
        assert f.attrs["recipe"] == "rcnn"
        assert sorted(json.loads(f.attrs["inputs"])) == [str(shard_path(layout.features_dir("rcnn", "trainval"), k))
                                                         for k in range(2)]
    for c, name in enumerate(("a", "b")):
        expected = sum(int((_iou(img)[:, c] > 0.6).sum()) for img in images)
        assert stats[name]["samples"] == expected
        assert stats[name]["proposals"] == expected - len(images)  # each image's own ground-truth row is a sample
    assert stats["c"] == {"samples": 0, "proposals": 0, "iou_before": None, "iou_after": None}
    assert model.trained.tolist() == [True, True, False]
    boxes = np.array([[1, 2, 30, 40]], np.float32)
    np.testing.assert_array_equal(model.predict(2, np.ones((1, 12), np.float32), boxes), boxes)
    assert model.predict(0, np.zeros((0, 12)), np.zeros((0, 4))).shape == (0, 4)


def _iou(image: dict) -> np.ndarray:
    labels = image["gt_label"]
    return class_iou(image["boxes"], image["boxes"][labels >= 0], labels[labels >= 0], len(CLASSES))


def _cached_pool(images: list[dict]) -> np.ndarray:
    """Every image's pool rows as cached (float16), in float64."""
    return np.concatenate([img["pool"].astype(np.float16).astype(np.float64) for img in images])


def test_feature_scale_gives_mean_norm_20(trained):
    model, images, _ = trained  # 8 x 54 rows < norm_sample: the sample is every row
    assert np.linalg.norm(_cached_pool(images) * model.feature_scale, axis=1).mean() == pytest.approx(20.0, rel=1e-6)


def test_feature_scale_follows_its_params(trained):
    model, images, out = trained
    bbox.run(dataclasses.replace(PARAMS, target_norm=5.0), "rcnn", "trainval", 2, out)
    assert load_bbox(out).feature_scale == pytest.approx(model.feature_scale / 4, rel=1e-12)
    sampled = []
    for seed in (0, 1):  # 100 of the 432 rows: the mean norm of another sample differs
        bbox.run(dataclasses.replace(PARAMS, norm_sample=100, seed=seed), "rcnn", "trainval", 2, out)
        sampled.append(load_bbox(out).feature_scale)
        with FeatureSet("rcnn", "trainval", 2) as features:
            sample = norm_sample_rows(features.counts(), seed, 100)
            rows = np.concatenate([features.rows("pool", i)[r] for i, r in sample.items()]).astype(np.float64)
        assert len(rows) == 100
        assert np.linalg.norm(rows * sampled[-1], axis=1).mean() == pytest.approx(20.0, rel=1e-12)
    assert sampled[0] != sampled[1]
    assert np.linalg.norm(_cached_pool(images) * sampled[0], axis=1).mean() != pytest.approx(20.0)


def test_rerun_is_byte_identical_and_save_load_round_trip(trained, tmp_path):
    model, _, out = trained
    before = out.read_bytes()
    bbox.run(PARAMS, "rcnn", "trainval", 2, out)
    assert out.read_bytes() == before
    model.save(tmp_path / "copy.h5", {"recipe": "x"})
    again = load_bbox(tmp_path / "copy.h5")
    for name in ("weights", "biases", "target_mean", "target_std", "trained"):
        np.testing.assert_array_equal(getattr(again, name), getattr(model, name))
    assert (again.feature_scale, again.classes) == (model.feature_scale, model.classes)
    assert model.weights.shape == (3, 12, 4) and model.weights.dtype == np.float32


def test_standardisation_round_trip_by_hand():
    # zero weights: the standardised prediction is the bias, de-standardised as bias * std + mean
    model = BoxRegressor(
        weights=np.zeros((1, 3, 4), np.float32), biases=np.array([[1.0, -1.0, 0.0, 2.0]], np.float32),
        target_mean=np.array([[0.1, 0.2, 0.0, 0.0]], np.float32),
        target_std=np.array([[0.1, 0.1, 1.0, np.log(2) / 2]], np.float32),
        feature_scale=3.0, classes=["a"], trained=np.array([True]),
    )
    # deltas: tx = 0.1 + 0.1 = 0.2, ty = 0.2 - 0.1 = 0.1, tw = 0, th = log 2
    np.testing.assert_allclose(model.deltas(0, np.ones((1, 3))), [[0.2, 0.1, 0.0, np.log(2)]], rtol=1e-6)
    # box 10x20 centred (15, 20) -> centre (17, 22), size 10x40
    np.testing.assert_allclose(model.predict(0, np.ones((1, 3)), [[10, 10, 20, 30]]), [[12, 2, 22, 42]], rtol=1e-6)


def test_fit_class_standardises_and_inverts():
    rng = np.random.default_rng(0)
    deltas = (rng.normal(size=(50, 4)) * [0.01, 0.02, 3.0, 0.5] + [0.3, -0.2, 5.0, 0.0]).astype(np.float32)
    x = np.concatenate([deltas, rng.normal(size=(50, 2))], axis=1)
    weights, bias, mean, std = fit_class(x, deltas, ridge_lambda=1e-8)
    np.testing.assert_allclose(mean, deltas.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(std, deltas.std(axis=0), rtol=1e-5)
    np.testing.assert_allclose(((x @ weights + bias) * std + mean), deltas, atol=1e-4)
    # a constant target: std floored, no division by zero, prediction is the constant
    constant = np.tile([0.5, 0.0, 0.0, 0.0], (50, 1)).astype(np.float32)
    weights, bias, mean, std = fit_class(x, constant, ridge_lambda=1.0)
    np.testing.assert_array_equal(std, [bbox.STD_FLOOR] * 4)
    np.testing.assert_allclose((x @ weights + bias) * std + mean, constant, atol=1e-6)


def test_target_is_the_most_overlapping_ground_truth_of_the_class():
    boxes = np.array([
        [0, 0, 10, 10],  # proposal: IoU 81/100 with gt row 3, 81/109 with gt row 4 -> target row 3
        [1, 0, 11, 10],  # proposal: IoU 72/109 with row 3, 90/100 with row 4 -> target row 4
        [50, 50, 60, 60],  # nothing
        [0, 0, 9, 9],  # gt class 0
        [1, 0, 11, 9],  # gt class 0
        [0, 0, 10, 10],  # gt class 1 (the first proposal's place; overlaps rows 3, 4 like it)
    ], np.float32)
    labels = np.array([-1, -1, -1, 0, 0, 1], np.int32)
    iou = class_iou(boxes, boxes[3:], labels[3:], 2)
    chosen, per_class = image_targets(boxes, labels, iou, 0.6, "test")
    assert chosen.tolist() == [0, 1, 3, 4, 5]
    (c0, positions0, targets0), (c1, positions1, targets1) = per_class
    assert (c0, positions0.tolist()) == (0, [0, 1, 2, 3, 4])  # gt rows are samples, of any class
    np.testing.assert_array_equal(targets0, boxes[[3, 4, 3, 4, 3]])
    assert (c1, positions1.tolist()) == (1, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(targets1, np.repeat(boxes[5:], 5, axis=0))


def test_samples_without_ground_truth_rows_are_an_error():
    boxes = np.array([[0, 0, 10, 10]], np.float32)
    iou = np.array([[0.9]], np.float32)  # e.g. the test split: IoU with the index, but no ground-truth rows
    with pytest.raises(ArtifactError, match="no ground-truth rows"):
        image_targets(boxes, np.array([-1], np.int32), iou, 0.6, "test")


def test_paired_iou_by_hand():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 0, 0]], np.float32)
    b = np.array([[5, 0, 15, 10], [0, 0, 10, 10], [0, 0, 0, 0]], np.float32)
    np.testing.assert_allclose(paired_iou(a, b), [50 / 150, 1.0, 0.0])


def test_missing_or_foreign_model_file(tmp_path):
    with pytest.raises(ArtifactError, match="run the bbox stage"):
        load_bbox(tmp_path / "none.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=[1])
    with pytest.raises(ArtifactError, match="not a box-regressor file"):
        load_bbox(tmp_path / "other.h5")
