"""Stage ``svm``: the model file, the objective, hard-negative mining by hand, and the stage on a synthetic feature cache."""
from __future__ import annotations

import dataclasses
import json

import h5py
import numpy as np
import pytest

from stages import svm
from stages.core import layout
from stages.core.config import SvmParams
from stages.core.store import create_per_image, shard_path
from stages.data.featureset import IMAGE_DATASETS, FeatureSet, feature_row, norm_sample_rows, region_rows
from stages.models.svm import SvmError, SvmModel, load_svm
from stages.svm import HardNegativeMiner, class_C, objective

SPLIT = "trainval"
DIM = 8
ROW_SCALE = 0.05  # raw features are small, so that feature_scale matters
PROPOSALS = 40  # per image
MEANS = 3.0 * np.eye(3, DIM)  # class c's features lie around 3 * e_c

PARAMS = SvmParams(C=0.1, C_positives=0, positive_weight=2.0, intercept_scaling=10.0, target_norm=20.0,
                   norm_sample=300, neg_iou=0.3, hard_threshold=-1.0001, easy_threshold=-1.2, retrain_every=60,
                   passes=1, mining=True, seed=0)


# --- synthetic feature cache ----------------------------------------------------------------------


def synthetic_images(seed: int, num_images: int, present: tuple[int, ...], num_classes: int) -> list[dict[str, np.ndarray]]:
    """Rows of each image: proposals then ground truth, Gaussian blobs around MEANS (see :func:`_image`)."""
    rng = np.random.default_rng(seed)
    return [_image(rng, present, num_classes) for _ in range(num_images)]


def _image(rng: np.random.Generator, present: tuple[int, ...], num_classes: int) -> dict[str, np.ndarray]:
    """Ground truth of 1-2 objects; proposals are background (IoU < 0.2) or overlap one object by IoU u ~ U(0, 1)
    with features ``u * mean + noise``, so the low-overlap ones are the hard negatives."""
    labels = rng.choice(present, size=int(rng.integers(1, 3))).astype(np.int32)
    gt_fc = MEANS[labels] + rng.normal(0, 0.5, (len(labels), DIM))
    iou = np.zeros((PROPOSALS, num_classes), np.float32)
    iou[:, list(present)] = rng.uniform(0, 0.2, (PROPOSALS, len(present)))
    fc = rng.normal(0, 0.5, (PROPOSALS, DIM))
    for p in np.flatnonzero(rng.random(PROPOSALS) < 0.4):
        label, overlap = labels[rng.integers(len(labels))], rng.uniform(0, 1)
        iou[p, label] = overlap
        fc[p] += overlap * MEANS[label]
    gt_iou = np.zeros((len(labels), num_classes), np.float32)
    gt_iou[np.arange(len(labels)), labels] = 1.0
    rows = PROPOSALS + len(labels)
    return {
        "boxes": np.tile(np.array([0, 0, 10, 10], np.float32), (rows, 1)),
        "gt_label": np.concatenate([np.full(PROPOSALS, -1, np.int32), labels]),
        "iou": np.concatenate([iou, gt_iou]),
        "fc": (ROW_SCALE * np.concatenate([fc, gt_fc])).astype(np.float16),
    }


def write_cache(images: list[dict[str, np.ndarray]], num_classes: int, num_shards: int = 2) -> None:
    """The rcnn feature shards of SPLIT, as the features stage writes them (only the datasets the SVMs read)."""
    rows = {**region_rows(num_classes), "fc": feature_row(DIM, "float16", 1)}
    classes = [f"class{c}" for c in range(num_classes)]
    for k, part in enumerate(np.array_split(np.arange(len(images)), num_shards)):
        attrs = {"classes": classes, "split": SPLIT, "shard_index": k, "num_shards": num_shards, "recipe": "rcnn"}
        with create_per_image(shard_path(layout.features_dir("rcnn", SPLIT), k), rows, attrs, IMAGE_DATASETS) as w:
            for i in part:
                w.append(f"img{i:03d}", images[i], widths=100, heights=100)


def train(tmp_path, params: SvmParams = PARAMS, num_workers: int = 1, name: str = "model") -> tuple[SvmModel, dict]:
    out, report = tmp_path / f"{name}.h5", tmp_path / f"{name}.json"
    svm.run(params, "rcnn", SPLIT, 2, out, report, num_workers)
    return load_svm(out), json.loads(report.read_text())


@pytest.fixture
def cache(workspace) -> list[dict[str, np.ndarray]]:
    images = synthetic_images(0, 40, (0, 1), 2)
    write_cache(images, 2)
    return images


def accuracy(model: SvmModel, images: list[dict[str, np.ndarray]], c: int) -> float:
    """Fraction of class ``c``'s positives scoring > 0 and negatives scoring < 0, over ``images``."""
    right = []
    for image in images:
        z = model.scores(image["fc"])[:, c]
        right += list(z[image["gt_label"] == c] > 0) + list(z[image["iou"][:, c] < 0.3] < 0)
    return float(np.mean(right))


# --- model file -----------------------------------------------------------------------------------


def test_model_round_trip_and_scores(tmp_path):
    model = SvmModel(np.array([[1, 0], [0, 2]]), np.array([0.5, -1]), 2.0, ["a", "b"])
    fc = np.array([[1, 1], [0, 3]], np.float16)
    # (fc * 2) @ W.T + b: [2, 2] -> [2.5, 3]; [0, 6] -> [0.5, 11]
    assert model.scores(fc).tolist() == [[2.5, 3.0], [0.5, 11.0]] and model.scores(fc).dtype == np.float32
    model.save(tmp_path / "m.h5", {"recipe": "rcnn", "params": {"svm": {"C": 1}}})
    back = load_svm(tmp_path / "m.h5")
    assert (back.weights == model.weights).all() and (back.biases == model.biases).all()
    assert back.feature_scale == 2.0 and back.classes == ["a", "b"]
    with h5py.File(tmp_path / "m.h5") as f:
        assert f.attrs["recipe"] == "rcnn" and json.loads(f.attrs["params"]) == {"svm": {"C": 1}}
    with pytest.raises(SvmError, match="dimension 2"):
        model.scores(np.zeros((3, 5)))


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(SvmError, match="not found"):
        load_svm(tmp_path / "none.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(SvmError, match="not an SVM model"):
        load_svm(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("weights", data=np.zeros((1, 2)))
    with pytest.raises(SvmError, match="not an SVM model"):
        load_svm(tmp_path / "other.h5")


# --- objective and mining by hand -----------------------------------------------------------------


def test_objective_by_hand():
    params = dataclasses.replace(PARAMS, C=0.1, positive_weight=2.0, intercept_scaling=10.0)
    terms = objective(np.array([1.0, 2.0]), 10.0, np.array([0.5, 2.0]), np.array([-2.0, 0.0]), params, params.C)
    # positives: 0.1 * 2 * (0.5 + 0); negatives: 0.1 * (0 + 1); regulariser: 0.5 * 5 + 0.5 * (10 / 10)^2
    assert terms["loss_positive"] == pytest.approx(0.1) and terms["loss_negative"] == pytest.approx(0.1)
    assert terms["regulariser"] == pytest.approx(3.0) and terms["objective"] == pytest.approx(3.2)


def test_objective_is_what_liblinear_minimises():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, (40, 3)).astype(np.float32), rng.normal(-1, 1, (60, 3)).astype(np.float32)
    params = dataclasses.replace(PARAMS, C=1.0, intercept_scaling=2.0)
    w, b, _ = svm.fit_svm(pos, neg, params, params.C, 0)

    def value(w, b):
        return objective(w, b, pos @ w + b, neg @ w + b, params, params.C)["objective"]

    best = value(w, b)
    for delta in np.concatenate([np.eye(4), -np.eye(4)]) * 0.05:
        assert value(w + delta[:3], b + delta[3]) > best


def test_class_C_scales_with_the_positives_by_hand():
    params = dataclasses.replace(PARAMS, C=0.001, C_positives=630)
    # R-CNN's balance at VOC07's 630 positives: 10x the C for 63 positives, a tenth of it for 6300
    assert class_C(params, 63) == pytest.approx(0.01) and class_C(params, 6300) == pytest.approx(0.0001)
    assert class_C(dataclasses.replace(params, C_positives=0), 63) == 0.001  # 0: one C for every class


def hand_miner(retrain_every: int = 2, mining: bool = True) -> HardNegativeMiner:
    params = dataclasses.replace(PARAMS, C=10.0, retrain_every=retrain_every)
    return HardNegativeMiner(np.array([[2.0], [2.0]]), params, 0, mining)


def test_mining_by_hand():
    # Positives at x = 2. Hard-margin solutions: with the nearest negative at 0, z = x - 1; at 0.5, z = 4/3 (x - 0.5) - 1.
    miner = hand_miner(retrain_every=2)
    miner.see_image(0, np.arange(4), np.array([[-10.0], [-10], [-10], [0]]), last=False)
    # no model yet: all 4 join and the first model is trained; x = -10 scores -11 < -1.2: evicted
    assert [(r["cache_negatives"], r["new_negatives"], r["evicted"]) for r in miner.rounds] == [(4, 4, 3)]
    assert miner.weights[0] == pytest.approx(1, abs=1e-2) and miner.bias == pytest.approx(-1, abs=1e-2)
    miner.see_image(1, np.arange(3), np.array([[-10.0], [-10], [0.5]]), last=False)  # only 0.5 (z = -0.5) is hard
    miner.see_image(1, np.array([2]), np.array([[0.5]]), last=False)  # already cached: not added again
    assert (len(miner.rounds), miner.added, miner.cache_size) == (1, 1, 2)
    miner.see_image(2, np.array([0]), np.array([[0.5]]), last=False)  # the 2nd new negative: retrain
    # new margin at 0.5: x = 0 now scores 4/3 * -0.5 - 1 = -1.67 < -1.2: evicted
    assert miner.weights[0] == pytest.approx(4 / 3, abs=1e-2) and miner.bias == pytest.approx(-5 / 3, abs=1e-2)
    miner.see_image(3, np.array([0]), np.array([[-10.0]]), last=True)  # easy, not added; the last image: retrain
    assert [(r["cache_negatives"], r["new_negatives"], r["evicted"]) for r in miner.rounds] == [(4, 4, 3), (3, 2, 1), (2, 0, 0)]
    # every example on its margin: (almost, liblinear stops early) no hinge loss, regulariser 0.5 (4/3)^2 + 0.5 (5/3 / 10)^2
    for r in miner.rounds[1:]:
        assert r["regulariser"] == pytest.approx(0.5 * 16 / 9 + 0.5 * (1 / 6) ** 2, abs=1e-2)
        assert r["objective"] == pytest.approx(r["regulariser"] + r["loss_positive"] + r["loss_negative"])
        assert r["loss_positive"] + r["loss_negative"] < 0.1
    assert miner.cache_size == 2 and miner.negatives_seen == 10


def test_without_mining_every_negative_is_kept_and_trained_once():
    miner = hand_miner(retrain_every=1, mining=False)
    miner.see_image(0, np.arange(2), np.array([[-10.0], [0]]), last=False)
    miner.see_image(1, np.arange(2), np.array([[-10.0], [0.5]]), last=True)
    assert [(r["cache_negatives"], r["new_negatives"]) for r in miner.rounds] == [(4, 4)]
    assert miner.weights[0] == pytest.approx(4 / 3, abs=1e-2)


# --- the stage on a synthetic feature cache -------------------------------------------------------


def test_stage_scales_mines_and_separates(cache, tmp_path):
    model, report = train(tmp_path)
    with FeatureSet("rcnn", SPLIT, 2) as features:
        sample = norm_sample_rows(features.counts(), PARAMS.seed, PARAMS.norm_sample, svm.NORM_IMAGES)
        rows = np.concatenate([features.rows("fc", i)[r] for i, r in sample.items()]).astype(np.float32)
    assert len(rows) == report["norm_sample_rows"] == PARAMS.norm_sample
    assert np.linalg.norm(rows * model.feature_scale, axis=1).mean() == pytest.approx(PARAMS.target_norm, rel=1e-5)
    assert report["feature_scale"] == pytest.approx(model.feature_scale) and model.feature_scale > 50
    for c, name in enumerate(model.classes):
        stats = report["classes"][name]
        rounds = stats["rounds"]
        assert stats["status"] == "trained" and stats["positives"] == sum(int((im["gt_label"] == c).sum()) for im in cache)
        assert stats["negatives_seen"] == sum(int((im["iou"][:, c] < 0.3).sum()) for im in cache)
        assert stats["final_cache_negatives"] < stats["negatives_seen"] / 5  # mining keeps the cache small
        assert (rounds[0]["pass"], rounds[0]["image"]) == (1, 1) and (rounds[-1]["pass"], rounds[-1]["image"]) == (1, 40)
        assert len(rounds) >= 3 and sum(r["evicted"] for r in rounds) > 0
        for r in rounds[1:-1]:  # retrained at the first image that brings the new negatives to retrain_every
            assert PARAMS.retrain_every <= r["new_negatives"] < PARAMS.retrain_every + PROPOSALS + 2
        added = sum(r["new_negatives"] for r in rounds)
        assert stats["final_cache_negatives"] == added - sum(r["evicted"] for r in rounds)
        held_out = synthetic_images(1, 20, (0, 1), 2)
        assert accuracy(model, held_out, c) > 0.97


def test_each_class_trains_at_its_own_C(cache, tmp_path):
    fixed, _ = train(tmp_path, name="fixed")  # C 0.1 for both classes
    positives = [sum(int((im["gt_label"] == c).sum()) for im in cache) for c in (0, 1)]
    assert positives[0] != positives[1]
    scaled, report = train(tmp_path, dataclasses.replace(PARAMS, C_positives=positives[0]), name="scaled")
    # class 0 has C_positives positives: C 0.1 as before, the same model; class 1 gets 0.1 * P0 / P1, another one
    C = [report["classes"][f"class{c}"]["C"] for c in (0, 1)]
    assert C == pytest.approx([0.1, 0.1 * positives[0] / positives[1]])
    assert (scaled.weights[0] == fixed.weights[0]).all() and scaled.biases[0] == fixed.biases[0]
    assert not (scaled.weights[1] == fixed.weights[1]).all()


def test_mining_agrees_with_all_at_once(cache, tmp_path):
    mined, _ = train(tmp_path, name="mined")
    everything, report = train(tmp_path, dataclasses.replace(PARAMS, mining=False), name="all")
    for name, stats in report["classes"].items():
        assert len(stats["rounds"]) == 1 and stats["rounds"][0]["cache_negatives"] == stats["negatives_seen"]
    held_out = synthetic_images(1, 20, (0, 1), 2)
    fc = np.concatenate([im["fc"] for im in held_out])
    agree = (mined.scores(fc) > 0) == (everything.scores(fc) > 0)
    assert agree.mean() > 0.99


def test_same_result_for_any_number_of_workers_and_reruns(cache, tmp_path):
    params = dataclasses.replace(PARAMS, passes=2)
    train(tmp_path, params, num_workers=1, name="one")
    train(tmp_path, params, num_workers=2, name="two")
    train(tmp_path, params, num_workers=1, name="again")
    one = (tmp_path / "one.h5").read_bytes()
    assert one == (tmp_path / "two.h5").read_bytes() == (tmp_path / "again.h5").read_bytes()
    with h5py.File(tmp_path / "one.h5") as f:
        assert set(json.loads(f.attrs["inputs"])) == {str(shard_path(layout.features_dir("rcnn", SPLIT), k)) for k in (0, 1)}
        assert json.loads(f.attrs["params"])["svm"]["passes"] == 2 and f.attrs["code_version"]
    rounds = json.loads((tmp_path / "one.json").read_text())["classes"]["class0"]["rounds"]
    assert rounds[-1]["pass"] == 2  # the second pass ran (and dedupes against the cache)


def test_class_without_positives_never_detects(workspace, tmp_path, capsys):
    images = synthetic_images(0, 12, (0, 2), 3)  # class 1 never appears
    write_cache(images, 3)
    model, report = train(tmp_path, dataclasses.replace(PARAMS, retrain_every=30))
    assert "'class1' cannot be trained" in capsys.readouterr().err
    assert report["classes"]["class1"]["status"] == "no_positives" and report["classes"]["class0"]["status"] == "trained"
    assert (model.weights[1] == 0).all() and model.biases[1] == svm.NEVER_BIAS
    assert (model.scores(np.concatenate([im["fc"] for im in images]))[:, 1] == svm.NEVER_BIAS).all()


def test_class_without_negatives_never_detects(cache, tmp_path, capsys):
    model, report = train(tmp_path, dataclasses.replace(PARAMS, neg_iou=0.0))  # no IoU is below 0
    assert "met no negative" in capsys.readouterr().err
    assert {s["status"] for s in report["classes"].values()} == {"no_negatives"}
    assert (model.biases == svm.NEVER_BIAS).all()


def test_missing_feature_cache_is_a_clear_error(workspace, tmp_path):
    with pytest.raises(Exception, match="run its stage first"):
        svm.run(PARAMS, "rcnn", SPLIT, 2, tmp_path / "m.h5", tmp_path / "r.json")
