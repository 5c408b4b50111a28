"""Stage ``spp_features`` on the tiny generated dataset: shapes, ground-truth rows, determinism, a direct check.

The proposals and pyramids of both splits are built once per session (:func:`spp_upstream`,
also used by ``test_spp_finetune.py``); each test works on a private copy.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import replace_section, run_spp, spp_config

from stages.core import layout, runs
from stages.core.config import load_config
from stages.core.store import ArtifactError, PerImageReader
from stages.models.backbones import build_backbone
from stages.data.images import image_scales, load_image
from stages.ops.spp import choose_scale, project_boxes, pyramid_pool

LEVELS = (1, 2)
CHANNELS = 112  # efficientnet_lite0's stride-16 map


def test_shards_hold_the_proposal_images_with_ground_truth_on_the_training_split(spp_workspace):
    cfg = spp_config(load_config())
    for split in cfg.data.splits:
        with PerImageReader([layout.index_file(split)]) as index:
            for shard in cfg.sharding.shards:
                with PerImageReader([layout.spp_shard(split, shard)]) as spp, \
                        PerImageReader([layout.proposals_shard(split, shard)]) as props:
                    spp.require_images_of(props)
                    assert spp.attrs["recipe"] == "sppnet" and spp.attrs["split"] == split
                    assert spp.json_attr("levels") == [1, 2] and spp.json_attr("scales") == [128]
                    assert int(spp.attrs["pool_dim"]) == CHANNELS * 5 and int(spp.attrs["stride"]) == 16
                    for k, image_id in enumerate(spp.image_ids):
                        i = index.position(image_id)
                        pool, labels, boxes = spp.rows("pool", k), spp.rows("gt_label", k), spp.rows("boxes", k)
                        num_gt = len(index.rows("gt_boxes", i)) if split == cfg.data.train_split else 0
                        num_proposals = len(props.rows("boxes", k))
                        assert pool.shape == (num_proposals + num_gt, CHANNELS * 5) and pool.dtype == np.float16
                        assert np.isfinite(pool).all() and np.ptp(pool) > 0
                        assert (labels[:num_proposals] == -1).all()
                        assert labels[num_proposals:].tolist() == index.rows("gt_labels", i)[:num_gt].tolist()
                        assert np.array_equal(boxes[:num_proposals], props.rows("boxes", k))
                        assert spp.rows("iou", k).shape == (len(boxes), len(spp.json_attr("classes")))
                        assert spp.value("widths", k) == index.value("widths", i)
                        assert spp.value("heights", k) == index.value("heights", i)


def test_rerun_is_byte_identical_whatever_the_workers(spp_workspace):
    cfg = spp_config(load_config())
    split = cfg.data.train_split
    run_spp(cfg, split, 0, spp_workspace / "again.h5", num_workers=2)
    assert (spp_workspace / "again.h5").read_bytes() == layout.spp_shard(split, 0).read_bytes()
    assert runs.read(spp_workspace / "again.h5") is not None


def test_pool_equals_a_direct_forward_and_pyramid(spp_workspace):
    cfg = spp_config(load_config())
    split = cfg.data.test_split
    with PerImageReader([layout.index_file(split)]) as index, PerImageReader([layout.spp_shard(split, 0)]) as spp:
        i = index.position(spp.image_ids[0])
        image = load_image(Path(index.attrs["data_root"]) / index.value("paths", i))
        boxes, pool = spp.rows("boxes", 0), spp.rows("pool", 0)
    height, width = image.shape[:2]
    (factor,) = image_scales(width, height, (128,), 256)
    resized = cv2.resize(image, (round(width * factor), round(height * factor)), interpolation=cv2.INTER_LINEAR)
    model = build_backbone(cfg.finetune.arch, cfg.finetune.weights)
    x = (torch.from_numpy(resized).permute(2, 0, 1).float() / 255 - torch.tensor(model.mean).view(3, 1, 1))
    x = x / torch.tensor(model.std).view(3, 1, 1)
    with torch.no_grad():
        conv = model.features(x[None])[0]
    assert conv.shape == (CHANNELS, -(-resized.shape[0] // 16), -(-resized.shape[1] // 16))
    for row in (0, len(boxes) // 2, len(boxes) - 1):
        cells = project_boxes(boxes[row:row + 1], factor, 16, conv.shape[1], conv.shape[2])
        expected = pyramid_pool(conv, cells, LEVELS)[0].half().numpy()
        np.testing.assert_allclose(pool[row].astype(np.float32), expected.astype(np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_multi_scale_pools_each_box_at_its_own_scale(spp_workspace):
    cfg = spp_config(load_config())
    split = cfg.data.test_split
    two = replace_section(cfg, "sppnet", scales=(128, 384), max_side=384)  # the tiny images' sides are 96..160
    run_spp(two, split, 0, spp_workspace / "two.h5")
    with PerImageReader([layout.spp_shard(split, 0)]) as one, PerImageReader([spp_workspace / "two.h5"]) as both:
        assert both.json_attr("scales") == [128, 384]
        chosen = []
        for k in range(len(one)):
            boxes = one.rows("boxes", k)
            width, height = int(one.value("widths", k)), int(one.value("heights", k))
            scale = choose_scale(boxes, image_scales(width, height, (128, 384), 384))
            same = (one.rows("pool", k) == both.rows("pool", k)).all(axis=1)
            # boxes pooled at 128 are exactly the single-scale pyramids; at 384 they come from another map
            assert same[scale == 0].all() and not same[scale == 1].any()
            chosen += scale.tolist()
        assert set(chosen) == {0, 1}  # large boxes are closest to 224^2 at 128, small ones at 384


def test_stale_proposal_shard_is_a_clear_error(spp_workspace):
    cfg = spp_config(load_config())
    stale = replace_section(cfg, "sharding", shards=(0, 1, 2))
    with pytest.raises(ArtifactError, match=r"shard-0.h5: written as shard 0 of 2, expected shard 0 of 3 \(stale artifact; rerun the proposals stage\)"):
        run_spp(stale, cfg.data.test_split, 0, spp_workspace / "x.h5")
    assert not (spp_workspace / "x.h5").exists()
