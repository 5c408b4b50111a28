"""The torchvision peer (bench.peer): torchvision's Faster R-CNN on our backbone, scored by our evaluate stage."""
from __future__ import annotations

import json

import pytest
import torch

from bench import peer
from stages import coco_gt
from stages.core import layout


def test_the_peer_wraps_the_registry_trunk_with_our_anchors_and_frozen_layers(tiny_config):
    model = peer.peer_model(tiny_config, 5)
    assert model.backbone.out_channels == 112
    assert model.rpn.anchor_generator.sizes == (tuple(tiny_config.faster_rcnn.anchor_sizes),)
    first = list(model.backbone.children())[:tiny_config.fast_rcnn.learn_from]
    assert first and not any(p.requires_grad for m in first for p in m.parameters())
    assert model.roi_heads.box_predictor.cls_score.out_features == 6


@pytest.mark.slow
def test_a_short_peer_run_trains_detects_and_is_scored_by_the_evaluate_stage(tiny_config, monkeypatch):
    import dataclasses

    cfg = tiny_config
    coco_gt.run(layout.index_file(cfg.data.test_split), layout.coco_ground_truth(cfg.data.test_split))
    monkeypatch.setattr(peer, "load_config", lambda: dataclasses.replace(
        cfg, finetune=dataclasses.replace(cfg.finetune, weights="random")))
    torch.set_num_threads(2)
    summary = peer.main(["--seconds", "3"])
    assert summary["iterations"] >= 1 and 0 <= summary["mAP_voc07"] <= 1
    metrics = json.loads((peer.PEER / "map_torchvision_peer.json").read_text())
    assert metrics["recipe"] == "torchvision_peer" and "coco" in metrics
