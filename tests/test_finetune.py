"""Stage ``finetune``: mini-batch sampling, a tiny training run, determinism, frozen batch norms, a killed run resumed,
errors."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO
from torch import nn

from stages import finetune, proposals
from stages.core import layout
from stages.core.errors import PipelineError
from stages.core.faults import KILL_AT
from stages.core.layout import checkpoint_file
from stages.core.store import ArtifactError
from stages.finetune import batch_plan
from stages.models.backbones import build_backbone
from stages.models.batch_norms import bake_folded_weights, fold_batch_norms
from stages.models.finetuned import load_model
from stages.ops.sampling import SamplingError

CHECKPOINT = checkpoint_file("finetune")
TINY = {"weights": "random", "input_size": 64, "batch_size": 8, "epochs": 100.0, "max_iterations": 4,
        "lr_drop": 0.5}
# finetune.run in a process of its own, with the workspace's params.yaml and the changes given as JSON
RUN_SCRIPT = """
import dataclasses, json, sys
from pathlib import Path
from stages import finetune
from stages.core.config import load_config
cfg = load_config()
params = dataclasses.replace(cfg.finetune, **json.loads(sys.argv[1]))
finetune.run(params, cfg.data.train_split, cfg.sharding.num_shards, Path(sys.argv[2]), Path(sys.argv[3]),
             num_workers=1, checkpoint_every=int(sys.argv[4]))
"""


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
    return dataclasses.replace(cfg.finetune, **{**TINY, **changes})


@pytest.mark.slow
def test_tiny_run_trains_saves_and_is_deterministic(workspace, tiny_config):
    cfg = tiny_config
    split = cfg.data.train_split
    _proposals(cfg, split)
    params = _tiny(cfg)
    shards = cfg.sharding.num_shards
    finetune.run(params, split, shards, workspace / "m1.pt", workspace / "c1.csv", num_workers=1, checkpoint_every=2)
    assert not CHECKPOINT.exists()  # removed once the model is written
    finetune.run(params, split, shards, workspace / "m2.pt", workspace / "c2.csv", num_workers=2, checkpoint_every=0)

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
    # same seed -> same curve, whatever the number of loader workers and checkpoints
    assert (workspace / "c2.csv").read_text() == (workspace / "c1.csv").read_text()
    assert (workspace / "m2.pt").read_bytes() == (workspace / "m1.pt").read_bytes()
    saved = torch.load(workspace / "m1.pt", weights_only=True)
    assert saved["num_classes"] == len(classes) + 1 and saved["padding"] == params.padding
    assert not list(workspace.glob(".m1.pt.*"))  # no temporaries left


@pytest.mark.slow
def test_batch_norms_keep_their_imagenet_statistics(workspace, tiny_config):
    cfg = tiny_config
    split = cfg.data.train_split
    _proposals(cfg, split)
    params = _tiny(cfg, weights="imagenet", max_iterations=2)
    finetune.run(params, split, cfg.sharding.num_shards, workspace / "m.pt", workspace / "c.csv", num_workers=1)
    trained = load_model(workspace / "m.pt")
    imagenet = bake_folded_weights(fold_batch_norms(build_backbone(params.arch, "imagenet", len(trained.classes) + 1)))

    assert not any(isinstance(m, nn.BatchNorm2d) for m in trained.modules())
    shifts, reference = dict(trained.named_buffers()), dict(imagenet.named_buffers())
    folded = [name for name in reference if name.endswith(".bias")]
    assert len(folded) > 40 and all(torch.equal(shifts[name], reference[name]) for name in folded)
    weights, start = dict(trained.named_parameters()), dict(imagenet.named_parameters())
    assert not torch.equal(weights["features.0.weight"], start["features.0.weight"])  # the convs learned


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint_to_the_same_bytes(workspace, tiny_config, capsys):
    cfg = tiny_config
    split, shards = cfg.data.train_split, cfg.sharding.num_shards
    _proposals(cfg, split)
    changes = {**TINY, "input_size": 32, "batch_size": 4}  # 4 iterations
    finetune.run(_tiny(cfg, **changes), split, shards, workspace / "whole.pt", workspace / "whole.csv",
                 num_workers=1, checkpoint_every=1)

    # killed right after its second checkpoint (iteration 2 of 4), in a process of its own
    env = {**os.environ, KILL_AT: "checkpoint-written:2", "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", RUN_SCRIPT, json.dumps(changes), "resumed.pt", "resumed.csv", "1"],
                            env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (workspace / "resumed.pt").exists() and not (workspace / "resumed.csv").exists()
    assert torch.load(CHECKPOINT, weights_only=True)["iteration"] == 2

    capsys.readouterr()
    finetune.run(_tiny(cfg, **changes), split, shards, workspace / "resumed.pt", workspace / "resumed.csv",
                 num_workers=1, checkpoint_every=1)
    assert f"resumed from {CHECKPOINT} at iteration 2" in capsys.readouterr().out
    assert (workspace / "resumed.pt").read_bytes() == (workspace / "whole.pt").read_bytes()
    assert (workspace / "resumed.csv").read_text() == (workspace / "whole.csv").read_text()
    assert not CHECKPOINT.exists()


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
    monkeypatch.setattr(finetune, "assign_labels", lambda iou, *_: np.zeros(len(iou), np.int64))
    with pytest.raises(SamplingError, match="no foreground windows"):
        finetune.run(_tiny(cfg), split, 1, workspace / "m.pt", workspace / "c.csv", num_workers=1)
    assert not (workspace / "m.pt").exists()


def test_load_model_rejects_other_files(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        load_model(tmp_path / "missing.pt")
    torch.save({"arch": "efficientnet_lite0"}, tmp_path / "bad.pt")
    with pytest.raises(ArtifactError, match="not a fine-tuned model"):
        load_model(tmp_path / "bad.pt")
