"""Faster R-CNN's stages on the tiny dataset: the alternating steps (rpn_train, rpn_proposals, fast_rcnn_train from
a model), joint training, and test time (faster_rcnn_detect)."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from stages import fast_rcnn_train, faster_rcnn_detect, faster_rcnn_joint, recall, rpn_proposals, rpn_train
from stages.core import layout
from stages.core.config import load_config
from stages.core.store import PerImageReader
from stages.faster_rcnn_joint import sampled_rois
from stages.models.fast_rcnn import FastRcnn, FasterRcnn, load_fast_rcnn
from stages.rpn_train import batch_ground_truth


def test_a_batchs_ground_truth_is_split_by_image():
    batch = {"images": torch.zeros((2, 16, 16, 3)), "labels": torch.tensor([1, 2, 1]),
             "rois": torch.tensor([[0, 0, 0, 10, 10], [1, 5, 5, 9, 9], [1, 0, 0, 4, 4]], dtype=torch.float32)}
    boxes, labels = batch_ground_truth(batch)
    assert [b.tolist() for b in boxes] == [[[0, 0, 10, 10]], [[5, 5, 9, 9], [0, 0, 4, 4]]]
    assert [x.tolist() for x in labels] == [[1], [2, 1]]


def test_joint_training_samples_rois_from_the_proposals_and_the_ground_truth(tiny_config):
    params = dataclasses.replace(tiny_config.fast_rcnn, rois_per_image=4, positive_fraction=0.5)
    proposals = [torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60], [40, 40, 70, 70]], dtype=torch.float32)]
    gt, labels = [torch.tensor([[0, 0, 10, 10.0]])], [torch.tensor([3])]
    sample = sampled_rois(np.random.default_rng(0), proposals, gt, labels, params)
    assert sample["rois"].shape == (4, 5) and (sample["rois"][:, 0] == 0).all()
    assert sorted(sample["labels"].tolist()) == [0, 0, 3, 3]  # 2 foreground (class 2 as 3), 2 background
    assert sample["targets"].shape == (4, 4)


@pytest.fixture(scope="module")
def alternating(tiny_workspace, tmp_path_factory):
    """Steps 1 to 5 of the alternating training run in a copy of the tiny workspace; its folder."""
    folder = tmp_path_factory.mktemp("alternating") / "ws"
    shutil.copytree(tiny_workspace, folder, symlinks=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        cfg = load_config()
        faster, fast = cfg.faster_rcnn, cfg.fast_rcnn
        finetune = dataclasses.replace(cfg.finetune, weights="random")
        train, shards = cfg.data.train_split, cfg.sharding.num_shards
        model = layout.faster_rcnn_model
        rpn_train.run(1, faster, fast, finetune, train, model("m1"), layout.faster_rcnn_curve("m1"), num_workers=1)
        for name, step in (("m1", 2), ("m3", 4)):
            if name == "m3":
                rpn_train.run(4, faster, fast, finetune, train, model("m3"), layout.faster_rcnn_curve("m3"),
                              init_path=model("m2"), num_workers=1)
            for split in cfg.data.splits:
                for shard in cfg.sharding.shards:
                    rpn_proposals.run(faster, fast, split, shard, shards, train, model(name),
                                      layout.rpn_proposals_shard(name, split, shard), num_workers=1)
            if name == "m1":
                fast_rcnn_train.run("m2", fast, finetune, train, shards, layout.rpn_proposals_dir("m1", train),
                                    model("m2"), layout.faster_rcnn_curve("m2"), num_workers=1, checkpoint_every=0)
        fast_rcnn_train.run("faster_rcnn", fast, finetune, train, shards, layout.rpn_proposals_dir("m3", train),
                            model("faster_rcnn"), layout.faster_rcnn_curve("faster_rcnn"), init_path=model("m3"),
                            num_workers=1, checkpoint_every=0)
    return folder


def _state(name: str) -> dict[str, torch.Tensor]:
    return torch.load(layout.faster_rcnn_model(name), weights_only=True)["state_dict"]


def _same(a: dict, b: dict, prefix: str) -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    return bool(keys) and all(torch.equal(a[k], b[k]) for k in keys)


@pytest.mark.slow
def test_each_step_starts_from_the_last_and_changes_only_what_it_trains(alternating, monkeypatch):
    monkeypatch.chdir(alternating)
    m1, m2, m3, final = (_state(n) for n in ("m1", "m2", "m3", "faster_rcnn"))
    assert isinstance(load_fast_rcnn(layout.faster_rcnn_model("m2")), FastRcnn)
    assert not any(k.startswith("rpn_head.") for k in m2)  # step 3: a detector alone, from ImageNet
    assert not _same(m1, m2, "trunk.")  # trained apart
    # step 4: a new RPN on m2's frozen trunk, m2's detector carried on
    assert _same(m2, m3, "trunk.") and _same(m2, m3, "fc.") and _same(m2, m3, "cls_score.")
    assert not _same(m1, m3, "rpn_head.")
    # step 5: only the fc layers and outputs learn: the trunk and the RPN are m3's, tensor for tensor
    assert _same(m3, final, "trunk.") and _same(m3, final, "rpn_head.")
    assert not _same(m3, final, "fc.") and not _same(m3, final, "bbox_pred.")
    assert isinstance(load_fast_rcnn(layout.faster_rcnn_model("faster_rcnn")), FasterRcnn)


@pytest.mark.slow
def test_rpn_proposals_are_proposal_shards_the_recall_stage_reads(alternating, monkeypatch):
    monkeypatch.chdir(alternating)
    cfg = load_config()
    with PerImageReader.sharded(layout.rpn_proposals_dir("m3", "test"), cfg.sharding.num_shards) as shards, \
            PerImageReader([layout.index_file("test")]) as index:
        shards.require_images_of(index)
        assert shards.counts().max() <= cfg.faster_rcnn.test_proposals
        assert shards.attrs["stage"] == "rpn_proposals"
    with PerImageReader.sharded(layout.rpn_proposals_dir("m3", "trainval"), cfg.sharding.num_shards) as shards:
        assert cfg.faster_rcnn.test_proposals < shards.counts().max() <= cfg.faster_rcnn.train_proposals
    recall.run(cfg.data.splits, cfg.sharding.num_shards, layout.rpn_recall_metrics("m3"), rpn="m3")
    report = json.loads(layout.rpn_recall_metrics("m3").read_text())
    assert set(report) == {"trainval", "test"} and 0 <= report["test"]["recall@0.5"] <= 1
    assert layout.recall_curve("test", "m3").is_file()


@pytest.mark.slow
def test_test_time_runs_one_conv_pass_per_image_and_counts_images_without_proposals(alternating, monkeypatch):
    monkeypatch.chdir(alternating)
    cfg = load_config()
    passes = []
    conv = FasterRcnn.conv
    monkeypatch.setattr(FasterRcnn, "conv", lambda self, images: passes.append(len(images)) or conv(self, images))
    nms = set()
    detections = faster_rcnn_detect.detections
    monkeypatch.setattr(faster_rcnn_detect, "detections", lambda *args: nms.add(args[-1].nms_iou) or detections(*args))
    out, coco = layout.detections_file("faster_rcnn"), layout.coco_detections("faster_rcnn")
    faster_rcnn_detect.run(cfg.detect, cfg.fast_rcnn, cfg.faster_rcnn, "faster_rcnn", "test",
                           layout.faster_rcnn_model("faster_rcnn"), out, coco, num_workers=1)
    with PerImageReader([layout.index_file("test")]) as index, PerImageReader([out]) as found:
        assert passes == [1] * len(index)  # the proposals and the detections share each image's one pass
        assert found.image_ids == index.image_ids and found.attrs["without_proposals"] == 0
        assert found.attrs["scores"] == "probability"
        recorded = found.json_attr("params")["faster_rcnn"]["detection_nms_iou"]
    assert nms == {recorded} == {cfg.faster_rcnn.detection_nms_iou} != {cfg.detect.nms_iou}  # the branch's own NMS
    nothing = dataclasses.replace(cfg.faster_rcnn, min_size=10_000.0)  # every proposal too small: none left
    faster_rcnn_detect.run(cfg.detect, cfg.fast_rcnn, nothing, "faster_rcnn", "test",
                           layout.faster_rcnn_model("faster_rcnn"), out, coco, num_workers=1)
    with PerImageReader([out]) as found:
        assert found.attrs["without_proposals"] == len(found) and found.counts().sum() == 0
    assert json.loads(coco.read_text()) == []


@pytest.mark.slow
def test_joint_training_trains_the_rpn_the_detector_and_the_trunk_together(alternating, monkeypatch):
    monkeypatch.chdir(alternating)
    cfg = load_config()
    finetune = dataclasses.replace(cfg.finetune, weights="random")
    path = layout.faster_rcnn_model("faster_rcnn_joint")
    torch.manual_seed(cfg.fast_rcnn.seed)
    initial = FasterRcnn(finetune.arch, 5, cfg.fast_rcnn.pooling, cfg.fast_rcnn.pool_size, cfg.fast_rcnn.hidden,
                         cfg.fast_rcnn.dropout, cfg.fast_rcnn.learn_from, cfg.fast_rcnn.target_means,
                         cfg.fast_rcnn.target_stds, anchor_sizes=cfg.faster_rcnn.anchor_sizes,
                         aspect_ratios=cfg.faster_rcnn.aspect_ratios).state_dict()
    faster_rcnn_joint.run(cfg.faster_rcnn, cfg.fast_rcnn, finetune, cfg.data.train_split, path,
                          layout.faster_rcnn_curve("faster_rcnn_joint"), num_workers=1, checkpoint_every=0)
    trained = _state("faster_rcnn_joint")
    last = f"trunk.{len(load_fast_rcnn(path).trunk) - 1}."
    for prefix in ("rpn_head.", "fc.", "cls_score.", last):
        assert not _same(initial, trained, prefix), prefix
    assert _same(initial, trained, "trunk.0.")  # frozen by fast_rcnn.learn_from
    assert layout.faster_rcnn_curve("faster_rcnn_joint").read_text().startswith("iteration,loss,accuracy")
