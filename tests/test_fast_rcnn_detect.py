"""Stage ``fast_rcnn_detect``: class-specific boxes, both heads' detections in the detect stage's format."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from stages import fast_rcnn_detect, fast_rcnn_train
from stages.core import layout, runs
from stages.core.store import ArtifactError, PerImageReader
from stages.fast_rcnn_detect import class_boxes, detections


def test_each_class_gets_its_own_regressed_box():
    proposals = np.array([[0, 0, 10, 20]], np.float32)
    deltas = np.zeros((1, 3, 4), np.float32)
    deltas[0, 1] = [0.1, 0, 0, 0]  # class 0: shifted right by a tenth of the width
    deltas[0, 2] = [0, 0, np.log(2), 0]  # class 1: twice as wide
    deltas[0, 0] = [9, 9, 9, 9]  # background: never decoded
    np.testing.assert_allclose(class_boxes(proposals, deltas)[0], [[1, 0, 11, 20], [-5, 0, 15, 20]], atol=1e-5)


def test_detections_threshold_clip_and_suppress(tiny_config):
    params = dataclasses.replace(tiny_config.detect, score_threshold=0.2, nms_iou=0.3, max_per_class=5)
    proposals = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 60, 60]], np.float32)
    probs = np.array([[0.1, 0.9, 0.0], [0.2, 0.8, 0.0], [0.85, 0.05, 0.1]], np.float32)
    found = detections(probs, np.zeros((3, 3, 4), np.float32), proposals, (50, 50), params)
    assert found["labels"].tolist() == [0]  # the second box is suppressed, the third scores too low
    assert found["scores"].tolist() == pytest.approx([0.9])
    found = detections(probs, np.zeros((3, 3, 4), np.float32), proposals, (50, 50),
                       dataclasses.replace(params, score_threshold=0.05))
    assert found["boxes"][-1].tolist() == [30, 30, 50, 50]  # clipped to the image


@pytest.mark.slow
def test_tiny_detection_writes_both_heads_in_the_detect_format(spp_workspace, monkeypatch):
    from stages.core.config import load_config

    outputs = fast_rcnn_detect.head_outputs
    cfg = load_config()
    finetune = dataclasses.replace(cfg.finetune, weights="random")
    model = layout.fast_rcnn_model("fast_rcnn")
    fast_rcnn_train.run("fast_rcnn", cfg.fast_rcnn, finetune, cfg.data.train_split, cfg.sharding.num_shards,
                        layout.proposals_dir(cfg.data.train_split), model, layout.fast_rcnn_curve("fast_rcnn"),
                        num_workers=1, checkpoint_every=0)
    paths = {name: (layout.detections_file(name), layout.coco_detections(name)) for name in ("fast_rcnn", "fast_rcnn_svd")}

    def detect(ranks):
        fast = dataclasses.replace(cfg.fast_rcnn, svd_ranks=ranks)
        fast_rcnn_detect.run(cfg.detect, fast, "fast_rcnn", cfg.data.test_split, cfg.sharding.num_shards, model,
                             *paths["fast_rcnn"], *paths["fast_rcnn_svd"], num_workers=1)

    detect((cfg.fast_rcnn.hidden, cfg.fast_rcnn.hidden))  # full rank: the SVD head detects as the original
    with PerImageReader([paths["fast_rcnn"][0]]) as full, PerImageReader([paths["fast_rcnn_svd"][0]]) as svd, \
            PerImageReader([layout.index_file(cfg.data.test_split)]) as index:
        assert full.image_ids == index.image_ids and full.attrs["recipe"] == "fast_rcnn"
        assert full.attrs["scores"] == svd.attrs["scores"] == "probability"
        assert svd.attrs["recipe"] == "fast_rcnn_svd" and "svd_ranks" not in json.loads(full.attrs["params"])["fast_rcnn"]
        for i in range(len(full)):
            np.testing.assert_allclose(svd.rows("scores", i), full.rows("scores", i), rtol=1e-3, atol=1e-5)
            labels = full.rows("labels", i)
            assert all((labels == c).sum() <= cfg.detect.max_per_class for c in np.unique(labels))
    results = json.loads(paths["fast_rcnn"][1].read_text())
    assert results and {"image_id", "category_id", "bbox", "score"} <= set(results[0])
    facts = runs.read(paths["fast_rcnn_svd"][0])
    assert facts["seconds_per_image"] >= facts["conv_seconds_per_image"] > 0

    full_bytes = paths["fast_rcnn"][0].read_bytes()
    detect((4, 2))  # only the _svd file records the ranks: the full head's detections keep their bytes
    with PerImageReader([paths["fast_rcnn_svd"][0]]) as svd:
        assert json.loads(svd.attrs["params"])["fast_rcnn"]["svd_ranks"] == [4, 2]
    assert paths["fast_rcnn"][0].read_bytes() == full_bytes

    heads = []
    monkeypatch.setattr(fast_rcnn_detect, "head_outputs",
                        lambda head, *args: heads.append(head) or outputs(head, *args))
    detect(())  # no compression: the _svd recipe is the same head, run once per image
    with PerImageReader([paths["fast_rcnn"][0]]) as full, PerImageReader([paths["fast_rcnn_svd"][0]]) as svd:
        assert len(heads) == len(full) and len(set(map(id, heads))) == 1
        for i in range(len(full)):
            assert all(np.array_equal(full.rows(n, i), svd.rows(n, i)) for n in ("boxes", "scores", "labels"))
    facts = {name: runs.read(path)["seconds_per_image"] for name, (path, _) in paths.items()}
    assert facts["fast_rcnn_svd"] == facts["fast_rcnn"]


def test_a_model_of_other_classes_is_a_stale_model(spp_workspace, monkeypatch):
    from stages.core.config import load_config

    cfg = load_config()
    model = fast_rcnn_train.FastRcnn(cfg.finetune.arch, 1, "roi_pool", 2, 8, 0.0, 0, [0.0] * 4, [1.0] * 4)
    model.classes = ["other"]
    monkeypatch.setattr(fast_rcnn_detect, "load_fast_rcnn", lambda path, baked=False: model.eval())
    out = [layout.detections_file("fast_rcnn"), layout.coco_detections("fast_rcnn"),
           layout.detections_file("fast_rcnn_svd"), layout.coco_detections("fast_rcnn_svd")]
    with pytest.raises(ArtifactError, match="stale model; rerun fast_rcnn_train"):
        fast_rcnn_detect.run(cfg.detect, cfg.fast_rcnn, "fast_rcnn", cfg.data.test_split, cfg.sharding.num_shards,
                             layout.fast_rcnn_model("fast_rcnn"), *out)
    assert not any(p.exists() for p in out)
