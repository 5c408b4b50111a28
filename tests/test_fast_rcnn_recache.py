"""Stage ``fast_rcnn_recache``: recipe fast_rcnn_svm's feature cache is the Fast R-CNN model's own pool, fc7 and
softmax; svm, bbox, detect, inspect and show run on it unchanged."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stages import bbox, detect, fast_rcnn_recache, svm
from stages.core import layout
from stages.core.config import load_config
from stages.core.store import ArtifactError, PerImageReader
from stages.data.featureset import FeatureSet
from stages.fast_rcnn_recache import region_features
from stages.data.images import scaled_images
from stages.models.fast_rcnn import FC6, FastRcnn, image_rois, load_fast_rcnn, model_file
from stages.tools import show
from stages.tools.describe import describe

RECIPE, MODEL = "fast_rcnn_svm", "fast_rcnn"
POOL_SIZE, HIDDEN = 2, 16


def tiny_model(num_classes: int) -> FastRcnn:
    """An untrained network of random weights, small fc layers, dropout 0.5 (the cache must be taken without it)."""
    torch.manual_seed(0)
    return FastRcnn("efficientnet_lite0", num_classes, "roi_pool", POOL_SIZE, HIDDEN, 0.5, 0, [0.0] * 4, [1.0] * 4,
                    weights="random").eval()


def save_model(classes: list[str]) -> FastRcnn:
    """:func:`tiny_model` saved where fast_rcnn_train writes model ``fast_rcnn``, loaded back as the stage loads it."""
    path = layout.fast_rcnn_model(MODEL)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = tiny_model(len(classes))
    torch.save({**model_file(model, classes, 0), "state_dict": model.state_dict()}, path)
    return load_fast_rcnn(path)


def recache(cfg, split: str, shard: int) -> None:
    fast_rcnn_recache.run(cfg.features, cfg.fast_rcnn, MODEL, split, shard, cfg.sharding.num_shards,
                          cfg.data.train_split, layout.fast_rcnn_model(MODEL),
                          layout.features_shard(RECIPE, split, shard), num_workers=1)


def test_features_are_taken_chunk_by_chunk_and_an_image_without_regions_has_none():
    model = tiny_model(3)
    pool_dim = model.fc[FC6].in_features
    conv = torch.randn(1, pool_dim // POOL_SIZE ** 2, 6, 8)
    rois = image_rois(np.array([[0, 0, 50, 40], [10, 20, 90, 90], [30, 5, 60, 70], [0, 0, 127, 95]]), 1.0)
    with torch.inference_mode():
        whole = region_features(model, conv, rois, 100, "float32")
        chunked = region_features(model, conv, rois, 3, "float32")
        empty = region_features(model, conv, rois[:0], 3, "float16")
    assert {k: v.shape for k, v in whole.items()} == {"pool": (4, pool_dim), "fc": (4, HIDDEN), "scores": (4, 4)}
    for name in whole:
        np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-5, atol=1e-6)
    assert {k: (v.shape, v.dtype) for k, v in empty.items()} == {
        "pool": ((0, pool_dim), np.float16), "fc": ((0, HIDDEN), np.float16), "scores": ((0, 4), np.float32)}


@pytest.mark.slow
def test_the_cache_holds_the_models_own_features_and_the_post_hoc_stages_run_on_it(spp_workspace):
    cfg = load_config()
    with PerImageReader([layout.index_file(cfg.data.train_split)]) as index:
        classes = [str(c) for c in index.json_attr("classes")]
    model = save_model(classes)
    for split in cfg.data.splits:
        for shard in cfg.sharding.shards:
            recache(cfg, split, shard)
    for split in cfg.data.splits:
        with FeatureSet(RECIPE, split, cfg.sharding.num_shards) as cache, \
                PerImageReader([layout.index_file(split)]) as index, \
                PerImageReader.sharded(layout.proposals_dir(split), cfg.sharding.num_shards) as proposals:
            assert cache.image_ids == proposals.image_ids and cache.classes == classes
            assert (cache.attrs["recipe"], cache.attrs["model"], cache.attrs["split"]) == (RECIPE, MODEL, split)
            assert (cache.dim("pool"), cache.dim("fc")) == (model.fc[FC6].in_features, HIDDEN)
            for i, image_id in enumerate(cache.image_ids):
                labels, boxes = cache.rows("gt_label", i), cache.rows("boxes", i)
                gt = index.rows("gt_boxes", index.position(image_id))
                np.testing.assert_array_equal(boxes[labels < 0], proposals.rows("boxes", i))
                if split == cfg.data.train_split:  # ground-truth rows on the training split only, last
                    np.testing.assert_array_equal(boxes[labels >= 0], gt)
                    assert (labels[:len(labels) - len(gt)] == -1).all()
                else:
                    assert (labels == -1).all()
        with FeatureSet(RECIPE, split, cfg.sharding.num_shards) as cache, \
                PerImageReader([layout.index_file(split)]) as index:
            image_id = cache.image_ids[0]
            path = Path(index.attrs["data_root"]) / index.value("paths", index.position(image_id))
            (image,), (factor,) = scaled_images(path, cfg.fast_rcnn.scales[:1], cfg.fast_rcnn.max_side, pin=False)
            with torch.inference_mode():
                conv = model.conv(image[None])
                rois = image_rois(cache.rows("boxes", 0), factor)
                fc7 = model.fc(model.pool(conv, rois))
                probs, _ = model.detect(conv, rois)  # what fast_rcnn_detect scores with
            assert fc7.abs().max() > 0
            np.testing.assert_allclose(cache.rows("fc", 0).astype(np.float32), fc7.numpy(), rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(cache.rows("scores", 0), probs.numpy(), rtol=1e-5, atol=1e-6)

    svm.run(cfg.svm, RECIPE, cfg.data.train_split, cfg.sharding.num_shards, layout.svm_model(RECIPE),
            layout.svm_report(RECIPE), num_workers=1)
    bbox.run(cfg.bbox, RECIPE, cfg.data.train_split, cfg.sharding.num_shards, layout.bbox_model(RECIPE))
    detect.run(cfg.detect, RECIPE, cfg.data.test_split, cfg.sharding.num_shards, layout.svm_model(RECIPE),
               layout.bbox_model(RECIPE), layout.detections_file(RECIPE), layout.coco_detections(RECIPE))
    with PerImageReader([layout.detections_file(RECIPE)]) as detections, \
            PerImageReader([layout.index_file(cfg.data.test_split)]) as index:
        assert detections.attrs["recipe"] == RECIPE and detections.image_ids == index.image_ids
        image_id = detections.image_ids[0]
    assert "fc" in describe(layout.features_dir(RECIPE, cfg.data.test_split))
    drawn = show.run(cfg.data.splits, cfg.sharding.num_shards, image_id, None, 0, recipe=RECIPE, drawing=cfg.evaluate)
    assert drawn.is_file()


def test_a_model_of_other_classes_is_stale_and_a_missing_one_names_its_stage(spp_workspace):
    cfg = load_config()
    save_model(["other"])
    split = cfg.data.test_split
    with pytest.raises(ArtifactError, match="stale model; rerun fast_rcnn_train"):
        recache(cfg, split, 0)
    assert not layout.features_shard(RECIPE, split, 0).exists()
    layout.fast_rcnn_model(MODEL).unlink()
    with pytest.raises(ArtifactError, match="run the stage that trains it first: fast_rcnn_train"):
        recache(cfg, split, 0)
