"""Stage ``finetune``: window labels, mini-batch sampling, a tiny training run, determinism, errors."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from stages import finetune, proposals
from stages.core import layout
from stages.core.errors import PipelineError
from stages.finetune import FinetuneError, batch_plan, label_windows, load_model
from stages.ops.sampling import SamplingError

GT = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], np.float32)
GT_LABELS = np.array([3, 1], np.int32)


def test_labels_by_hand():
    windows = np.array(
        [
            [0, 0, 10, 5],  # IoU 50/100 = 0.5 exactly with GT[0] -> foreground, class 3 -> label 4
            [0, 0, 10, 4.9],  # IoU 0.49 with GT[0] -> background
            [20, 0, 30, 8],  # IoU 0.8 with GT[1] (class 1) -> label 2
            [5, 0, 25, 10],  # IoU 1/3 with both -> background
            [2, 0, 30, 10],  # IoU 80/300 with GT[0], 100/280 with GT[1]: both below 0.5 -> background
            [0, 0, 10, 10],  # GT[0] itself -> label 4
            [40, 40, 50, 50],  # no overlap -> background
        ],
        np.float32,
    )
    assert label_windows(windows, GT, GT_LABELS, 0.5).tolist() == [4, 0, 2, 0, 0, 4, 0]


def test_labels_take_the_best_ground_truth_of_another_class():
    # Both windows pass fg_iou for both overlapping ground-truth boxes; the larger IoU decides the class.
    gt = np.array([[0, 0, 10, 10], [4, 0, 14, 10]], np.float32)  # classes 0 and 2
    windows = np.array([[3, 0, 13, 10], [1, 0, 11, 10]], np.float32)
    # [3,0,13,10]: IoU 7/13 = 0.54 with gt0, 9/11 = 0.82 with gt1 -> class 2 -> 3
    # [1,0,11,10]: IoU 9/11 = 0.82 with gt0, 7/13 = 0.54 with gt1 -> class 0 -> 1
    assert label_windows(windows, gt, np.array([0, 2]), 0.5).tolist() == [3, 1]
    assert label_windows(windows, np.zeros((0, 4), np.float32), np.zeros(0), 0.5).tolist() == [0, 0]


def test_batch_plan_depends_on_seed_and_batch_only(tiny_config):
    params = tiny_config.finetune
    fg, bg = np.arange(50), np.arange(50, 500)
    a, ma = batch_plan(params, fg, bg, 3)
    b, mb = batch_plan(params, fg, bg, 3)
    c, _ = batch_plan(params, fg, bg, 4)
    assert (a == b).all() and (ma == mb).all() and not (a == c).all()
    assert not batch_plan(dataclasses.replace(params, mirror=False), fg, bg, 3)[1].any()


def _proposals(cfg, split: str) -> None:
    for shard in range(cfg.sharding.num_shards):
        proposals.run(cfg.proposals, "raise", split, shard, cfg.sharding.num_shards,
                      layout.proposals_shard(split, shard), num_workers=1)


def _tiny(cfg, **changes):
    return dataclasses.replace(cfg.finetune, weights="random", input_size=64, batch_size=8, iterations=4,
                               lr_step=2, **changes)


def test_tiny_run_trains_saves_and_is_deterministic(workspace, tiny_config):
    cfg = tiny_config
    split = cfg.data.train_split
    _proposals(cfg, split)
    params = _tiny(cfg)
    shards = cfg.sharding.num_shards
    finetune.run(params, split, shards, workspace / "m1.pt", workspace / "c1.csv", num_workers=1)
    finetune.run(params, split, shards, workspace / "m2.pt", workspace / "c2.csv", num_workers=2)

    model = load_model(workspace / "m1.pt")
    classes = model.classes
    assert len(classes) >= 2 and not model.training and model.input_size == 64
    logits = model(torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, len(classes) + 1)

    lines = (workspace / "c1.csv").read_text().splitlines()
    assert lines[0] == "iteration,loss,accuracy"
    rows = [line.split(",") for line in lines[1:]]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r[1]) > 0 and 0 <= float(r[2]) <= 1 for r in rows)
    # same seed -> same curve, whatever the number of loader workers
    assert (workspace / "c2.csv").read_text() == (workspace / "c1.csv").read_text()
    assert (workspace / "m2.pt").read_bytes() == (workspace / "m1.pt").read_bytes()
    saved = torch.load(workspace / "m1.pt", weights_only=True)
    assert saved["num_classes"] == len(classes) + 1 and saved["padding"] == params.padding
    assert not list(workspace.glob(".m1.pt.*"))  # no temporaries left


def test_missing_proposal_shard_is_a_clear_error(workspace, tiny_config):
    cfg = tiny_config
    split = cfg.data.train_split
    proposals.run(cfg.proposals, "raise", split, 0, 2, layout.proposals_shard(split, 0), num_workers=1)
    with pytest.raises(PipelineError, match="shard-1.h5: artifact not found"):
        finetune.run(_tiny(cfg), split, 2, workspace / "m.pt", workspace / "c.csv", num_workers=1)
    assert not (workspace / "m.pt").exists() and not (workspace / "c.csv").exists()


def test_no_foreground_windows_fail_before_training(workspace, tiny_config, monkeypatch):
    cfg = tiny_config
    split = cfg.data.train_split
    proposals.run(cfg.proposals, "raise", split, 0, 1, layout.proposals_shard(split, 0), num_workers=1)
    # A split whose ground truth matches nothing: every window is background.
    monkeypatch.setattr(finetune, "label_windows", lambda boxes, *_: np.zeros(len(boxes), np.int64))
    with pytest.raises(SamplingError, match="no foreground windows"):
        finetune.run(_tiny(cfg), split, 1, workspace / "m.pt", workspace / "c.csv", num_workers=1)
    assert not (workspace / "m.pt").exists()


def test_load_model_rejects_other_files(tmp_path):
    with pytest.raises(FinetuneError, match="not found"):
        load_model(tmp_path / "missing.pt")
    torch.save({"arch": "efficientnet_lite0"}, tmp_path / "bad.pt")
    with pytest.raises(FinetuneError, match="not a fine-tuned model"):
        load_model(tmp_path / "bad.pt")
