"""Stage ``fast_rcnn_train``: mini-batches, both samplers, determinism, a killed run resumed, a diverging run."""
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

from stages import fast_rcnn_train
from stages.core.engine import TrainingError
from stages.core.faults import KILL_AT
from stages.core.layout import checkpoint_file, index_file, proposals_dir
from stages.core.store import PerImageReader
from stages.fast_rcnn_train import RoiBatches, collect_images, heuristic_step, ohem_step
from stages.models.fast_rcnn import FastRcnn, load_fast_rcnn

CHECKPOINT = checkpoint_file("fast_rcnn_train@fast_rcnn")
RUN_SCRIPT = """
import dataclasses, json, sys
from pathlib import Path
from stages import fast_rcnn_train
from stages.core.config import load_config
from stages.core.layout import proposals_dir
cfg = load_config()
params = dataclasses.replace(cfg.fast_rcnn, **json.loads(sys.argv[1]))
finetune = dataclasses.replace(cfg.finetune, weights="random")
fast_rcnn_train.run("fast_rcnn", params, finetune, cfg.data.train_split, cfg.sharding.num_shards,
                    proposals_dir(cfg.data.train_split), Path(sys.argv[2]), Path(sys.argv[3]), num_workers=1,
                    checkpoint_every=1)
"""


def _images(cfg):
    split = cfg.data.train_split
    with PerImageReader([index_file(split)]) as index, \
            PerImageReader.sharded(proposals_dir(split), cfg.sharding.num_shards) as proposals:
        return collect_images(index, proposals, cfg.fast_rcnn.fg_iou)


def _model(cfg) -> FastRcnn:
    p = cfg.fast_rcnn
    with PerImageReader([index_file(cfg.data.train_split)]) as index:
        classes = index.json_attr("classes")
    torch.manual_seed(0)
    return FastRcnn(cfg.finetune.arch, len(classes), p.pooling, p.pool_size, p.hidden, p.dropout, p.learn_from,
                    p.target_means, p.target_stds)


def _train(cfg, recipe, model_path, curve_path, num_workers=1, checkpoint_every=0, **changes):
    params = dataclasses.replace(cfg.fast_rcnn, **changes)
    finetune = dataclasses.replace(cfg.finetune, weights="random")  # what is learnt does not matter here
    fast_rcnn_train.run(recipe, params, finetune, cfg.data.train_split, cfg.sharding.num_shards,
                        proposals_dir(cfg.data.train_split), model_path, curve_path, num_workers=num_workers,
                        checkpoint_every=checkpoint_every)


def test_a_hierarchical_batch_holds_two_images_and_the_asked_proportions(spp_workspace):
    from stages.core.config import load_config

    cfg = load_config()
    p = dataclasses.replace(cfg.fast_rcnn, rois_per_image=8, positive_fraction=0.25, scales=(128,), max_side=150)
    batches = RoiBatches(_images(cfg), p, every_roi=False, pad=(127, 127, 127))
    batch = batches[0]
    images, rois, labels = batch["images"], batch["rois"], batch["labels"]
    assert images.dtype == torch.uint8 and images.shape[0] == 2 and max(images.shape[1:3]) <= 150  # max_side
    assert len(rois) == len(labels) == len(batch["targets"]) <= 16 and len(batch["image_ids"]) == 2
    for k in (0, 1):
        mine = labels[rois[:, 0] == k]
        assert len(mine) == 8 and (mine[:2] > 0).all() and (mine[2:] == 0).all()
    assert (rois[:, 3:5] <= torch.tensor(images.shape[2:0:-1]) + 1e-3).all()  # boxes inside the resized images
    again = batches[0]
    assert all(torch.equal(batch[k], again[k]) for k in ("images", "rois", "labels", "targets"))
    assert not torch.equal(batch["rois"], batches[1]["rois"])


def test_an_ohem_step_trains_on_at_most_b_rois_per_image(spp_workspace):
    from stages.core.config import load_config

    cfg = load_config()
    p = dataclasses.replace(cfg.fast_rcnn, ohem_rois=5, roi_chunk=16)
    batch = RoiBatches(_images(cfg), p, every_roi=True, pad=(127, 127, 127))[0]
    assert len(batch["rois"]) > 2 * 16  # every candidate of both images
    model = _model(cfg).train()
    seen = []
    heads = model.heads
    model.heads = lambda conv, rois: seen.append(len(rois)) or heads(conv, rois)
    loss, accuracy = ohem_step(p)(model, batch)
    assert all(n <= 16 for n in seen[:-1]) and seen[-1] <= 2 * 5  # chunks, then the hardest of each image
    assert loss.requires_grad and torch.isfinite(loss) and 0 <= accuracy <= 1
    loss.backward()
    assert model.fc[0].weight.grad is not None
    heuristic_loss, _ = heuristic_step(p)(_model(cfg).train(), RoiBatches(_images(cfg), p, False, (127,) * 3)[0])
    assert torch.isfinite(heuristic_loss)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fast_rcnn", "fast_rcnn_ohem"])
def test_tiny_run_trains_saves_and_is_deterministic(spp_workspace, recipe):
    from stages.core.config import load_config

    cfg = load_config()
    ws = spp_workspace
    _train(cfg, recipe, ws / "m1.pt", ws / "c1.csv", num_workers=1, checkpoint_every=2)
    _train(cfg, recipe, ws / "m2.pt", ws / "c2.csv", num_workers=2, checkpoint_every=0)
    assert (ws / "m1.pt").read_bytes() == (ws / "m2.pt").read_bytes()
    assert (ws / "c1.csv").read_text() == (ws / "c2.csv").read_text()
    assert not checkpoint_file(f"fast_rcnn_train@{recipe}").exists()
    rows = (ws / "c1.csv").read_text().splitlines()
    assert rows[0] == "iteration,loss,accuracy" and len(rows) == 1 + cfg.fast_rcnn.max_iterations
    saved = torch.load(ws / "m1.pt", weights_only=True)
    assert saved["sampler"] == {"fast_rcnn": "heuristic", "fast_rcnn_ohem": "ohem"}[recipe]
    assert saved["params"]["fast_rcnn"]["epochs"] == cfg.fast_rcnn.epochs and "code_version" in saved
    assert load_fast_rcnn(ws / "m1.pt").num_classes == _model(cfg).num_classes


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint_to_the_same_bytes(spp_workspace, capsys):
    from stages.core.config import load_config

    cfg = load_config()
    ws = spp_workspace
    _train(cfg, "fast_rcnn", ws / "whole.pt", ws / "whole.csv", checkpoint_every=1)
    env = {**os.environ, KILL_AT: "checkpoint-written:2", "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", RUN_SCRIPT, "{}", "resumed.pt", "resumed.csv"], env=env,
                            capture_output=True, text=True, timeout=300, start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (ws / "resumed.pt").exists() and torch.load(CHECKPOINT, weights_only=True)["iteration"] == 2
    capsys.readouterr()
    _train(cfg, "fast_rcnn", ws / "resumed.pt", ws / "resumed.csv", checkpoint_every=1)
    assert f"resumed from {CHECKPOINT} at iteration 2" in capsys.readouterr().out
    assert (ws / "resumed.pt").read_bytes() == (ws / "whole.pt").read_bytes()
    assert (ws / "resumed.csv").read_text() == (ws / "whole.csv").read_text()


def test_a_non_finite_loss_stops_naming_the_iteration_and_images_and_keeps_the_checkpoint(spp_workspace, monkeypatch):
    from stages.core.config import load_config

    cfg = load_config()
    calls = []
    losses = fast_rcnn_train.roi_losses

    def poisoned(*args):
        calls.append(1)
        values = losses(*args)
        return values * float("nan") if len(calls) == 3 else values

    monkeypatch.setattr(fast_rcnn_train, "roi_losses", poisoned)
    with pytest.raises(TrainingError, match=r"iteration 3 \(loss nan; images \S+\.jpg, \S+\.jpg\).*checkpoint"):
        _train(cfg, "fast_rcnn", spp_workspace / "m.pt", spp_workspace / "c.csv", checkpoint_every=1,
               max_iterations=4)
    assert not (spp_workspace / "m.pt").exists()
    assert torch.load(CHECKPOINT, weights_only=True)["iteration"] == 2


def test_images_without_objects_give_background_rois_only(spp_workspace):
    from stages.core.config import load_config

    cfg = load_config()
    images = [dataclasses.replace(i, rois=fast_rcnn_train.image_rois(i.rois.boxes, np.zeros((0, 4)), np.zeros(0), 0.5))
              for i in _images(cfg)]
    batch = RoiBatches(images, cfg.fast_rcnn, every_roi=False, pad=(127,) * 3)[0]
    assert len(batch["labels"]) > 0 and (batch["labels"] == 0).all()
    assert torch.isfinite(heuristic_step(cfg.fast_rcnn)(_model(cfg).train(), batch)[0])
