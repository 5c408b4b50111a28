"""Stages ``spp_finetune`` and ``spp_recache``: labels, sampling, a tiny training run, the re-cached features."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import spp_config

from stages import spp_finetune, spp_recache
from stages.core import layout, runs
from stages.core.config import load_config
from stages.core.layout import checkpoint_file
from stages.core.store import ArtifactError, PerImageReader
from stages.data.featureset import FeatureSet
from stages.models.spp_head import SppHead, load_head
from stages.spp_finetune import SppFinetuneError, region_labels, sample_regions


def test_region_labels_by_hand():
    gt_label = np.array([-1, -1, -1, -1, 2, 0], np.int32)
    iou = np.array(
        [
            [0.2, 0.7, 0.1],  # best class 1 at 0.7 -> label 2
            [0.5, 0.5, 0.0],  # tie at exactly fg_iou: the lower class -> label 1
            [0.49, 0.3, 0.1],  # below fg_iou -> background
            [0.0, 0.0, 0.0],  # no overlap -> background
            [0.0, 0.0, 1.0],  # ground truth of class 2 -> label 3
            [1.0, 0.0, 0.9],  # ground truth of class 0 -> label 1, whatever its IoU with other classes
        ],
        np.float32,
    )
    assert region_labels(gt_label, iou, 0.5).tolist() == [2, 1, 0, 0, 3, 1]


def test_sample_regions_fills_with_the_other_kind_when_one_is_missing():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [2] * 3)
    rows = sample_regions(rng, labels, 16, 0.25)
    assert len(rows) == 16 and (labels[rows[:4]] > 0).all() and (labels[rows[4:]] == 0).all()
    assert len(set(rows[4:].tolist())) == 12  # background: enough rows, no replacement
    assert (labels[sample_regions(rng, np.zeros(5, np.int64), 8, 0.25)] == 0).all()  # no foreground: all background
    only_fg = np.array([1, 3])
    rows = sample_regions(rng, only_fg, 8, 0.25)  # no background: all foreground, with replacement
    assert len(rows) == 8 and set(rows.tolist()) == {0, 1}


def test_head_shapes():
    torch.manual_seed(0)
    head = SppHead(pool_dim=10, hidden=6, num_outputs=4, dropout=0.5, feature_scale=2.0).eval()
    pool = torch.randn(3, 10, dtype=torch.float16)
    assert head.fc7(pool).shape == (3, 6) and (head.fc7(pool) >= 0).all()
    scores = head.scores(pool)
    assert scores.shape == (3, 4) and torch.allclose(scores.sum(1), torch.ones(3))
    # the feature scale is applied inside: scale 2 on x is scale 1 on 2 x
    unscaled = SppHead(10, 6, 4, 0.5).eval()
    unscaled.load_state_dict({**head.state_dict(), "feature_scale": torch.tensor(1.0)})
    assert torch.allclose(head.fc7(pool), unscaled.fc7(pool.float() * 2))


def _tiny(cfg, **changes):
    return dataclasses.replace(spp_config(cfg).sppnet, hidden=32, batch_size=16, max_iterations=4, lr_drop=0.5,
                               **changes)


@pytest.mark.slow
def test_tiny_run_trains_saves_is_deterministic_and_recaches(spp_workspace):
    cfg = load_config()
    split, shards = cfg.data.train_split, cfg.sharding.num_shards
    params = _tiny(cfg)
    spp_finetune.run(params, split, shards, spp_workspace / "h1.pt", spp_workspace / "c1.csv", num_workers=1,
                     checkpoint_every=2)
    assert not checkpoint_file("spp_finetune").exists()  # removed once the head is written
    spp_finetune.run(params, split, shards, spp_workspace / "h2.pt", spp_workspace / "c2.csv", num_workers=2,
                     checkpoint_every=0)
    assert (spp_workspace / "h1.pt").read_bytes() == (spp_workspace / "h2.pt").read_bytes()
    assert (spp_workspace / "c1.csv").read_text() == (spp_workspace / "c2.csv").read_text()
    lines = (spp_workspace / "c1.csv").read_text().splitlines()
    assert lines[0] == "iteration,loss,accuracy"
    rows = [line.split(",") for line in lines[1:]]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(float(r[1])) and float(r[1]) > 0 and 0 <= float(r[2]) <= 1 for r in rows)

    head = load_head(spp_workspace / "h1.pt")
    saved = torch.load(spp_workspace / "h1.pt", weights_only=True)
    assert not head.training and head.levels == (1, 2) and head.fc_dim == 32 and head.pool_dim == 112 * 5
    assert saved["feature_scale"] > 0 and float(head.feature_scale) == pytest.approx(saved["feature_scale"])

    for s in cfg.data.splits:
        for shard in cfg.sharding.shards:
            spp_recache.run(cfg.features, s, shard, shards, spp_workspace / "h1.pt",
                            layout.features_shard("sppnet", s, shard))
    with FeatureSet("sppnet", split, shards) as features, PerImageReader.sharded(layout.spp_dir(split), shards) as spp:
        features.require_images_of(spp)
        assert features.classes == head.classes and features.dim("fc") == 32 and features.dim("pool") == 112 * 5
        for i in range(len(features)):
            pool = features.rows("pool", i)
            assert np.array_equal(pool, spp.rows("pool", i))
            assert np.array_equal(features.rows("gt_label", i), spp.rows("gt_label", i))
            with torch.no_grad():
                fc = head.fc7(torch.from_numpy(pool)).numpy()
            np.testing.assert_allclose(features.rows("fc", i).astype(np.float32), fc, rtol=2e-3, atol=2e-3)
            scores = features.rows("scores", i)
            assert scores.shape == (len(pool), len(head.classes) + 1) and scores.dtype == np.float32
            np.testing.assert_allclose(scores.sum(1), 1, rtol=1e-5)
        assert features.attrs["recipe"] == "sppnet" and int(features.attrs["fc_dim"]) == 32
    assert runs.read(layout.features_shard("sppnet", split, 0)) is not None


def test_no_foreground_regions_fail_before_training(spp_workspace, monkeypatch):
    cfg = load_config()
    monkeypatch.setattr(spp_finetune, "region_labels", lambda gt_label, iou, fg_iou: np.zeros(len(gt_label), np.int64))
    with pytest.raises(SppFinetuneError, match="no foreground regions"):
        spp_finetune.run(_tiny(cfg), cfg.data.train_split, cfg.sharding.num_shards, spp_workspace / "h.pt",
                         spp_workspace / "c.csv", num_workers=1)
    assert not (spp_workspace / "h.pt").exists()


def test_recache_rejects_a_head_of_other_pyramids(spp_workspace):
    cfg = load_config()
    torch.save({"classes": ["a"], "num_classes": 2, "pool_dim": 7, "hidden": 4, "dropout": 0.5, "levels": [1],
                "state_dict": SppHead(7, 4, 2, 0.5).state_dict()}, spp_workspace / "other.pt")
    with pytest.raises(ArtifactError, match="does not fit"):
        spp_recache.run(cfg.features, cfg.data.test_split, 0, cfg.sharding.num_shards, spp_workspace / "other.pt",
                        spp_workspace / "out.h5")
    assert not (spp_workspace / "out.h5").exists()


def test_load_head_rejects_other_files(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        load_head(tmp_path / "missing.pt")
    torch.save({"pool_dim": 3}, tmp_path / "bad.pt")
    with pytest.raises(ArtifactError, match="not an SPP-net head file"):
        load_head(tmp_path / "bad.pt")
