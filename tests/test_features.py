"""Stage ``features``: region chunks across images, the cache format, agreement with a direct forward pass,
batch-size independence, determinism, empty images and shards, and the errors."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from stages import features, finetune, proposals
from stages.core import layout, runs
from stages.core.config import load_config
from stages.core.store import ArtifactError, PerImageReader, create_per_image
from stages.data.featureset import CHUNK_ROWS, FeatureSet, class_iou
from stages.data.images import load_image
from stages.features import FeatureError, RegionChunks, RowBuffer, read_regions, shard_images
from stages.models.finetuned import load_model
from stages.ops.warp import to_tensor_batch, warp_regions

MAX_BOXES = 9  # proposals per image: a handful of regions keeps every forward pass short


def _num_shards(cfg, split: str) -> int:
    """The training split in one proposal shard (fewer process pools to start), the test split in two."""
    return 1 if split == cfg.data.train_split else 2


@pytest.fixture(scope="module")
def prepared(tiny_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny workspace with proposals of both splits (all shards) and a fine-tuned model, built once."""
    folder = tmp_path_factory.mktemp("features") / "ws"
    shutil.copytree(tiny_workspace, folder, symlinks=True)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        cfg = load_config()
        params = dataclasses.replace(cfg.proposals, max_boxes=MAX_BOXES)
        for split in cfg.data.splits:
            shards = _num_shards(cfg, split)
            for shard in range(shards):
                out = layout.proposals_shard(split, shard)
                proposals.run(params, "raise", split, shard, shards, out, num_workers=1)
        finetune.run(_finetune(cfg), cfg.data.train_split, 1, layout.FINETUNED_MODEL, layout.FINETUNE_CURVE,
                     num_workers=1)
    finally:
        os.chdir(cwd)
    return folder


@pytest.fixture
def cfg(prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "ws"
    shutil.copytree(prepared, folder, symlinks=True)
    monkeypatch.chdir(folder)
    return load_config()


def _in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "default_workers", lambda num_workers: 0)


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Warp in the test process: spawning a loader worker (seconds) is not what these tests are about."""
    _in_process(monkeypatch)


def _finetune(cfg):
    """Two steps from the ImageNet weights (random ones give float16-subnormal features)."""
    return dataclasses.replace(cfg.finetune, max_iterations=2)


def _run(cfg, split: str, out: str, shard: int = 0, num_workers: int = 1, **changes) -> Path:
    params = dataclasses.replace(cfg.features, **{"model": "imagenet", "batch_size": 5, **changes})
    path = Path(out)
    features.run(params, _finetune(cfg), split, shard, _num_shards(cfg, split), cfg.data.train_split, path, num_workers)
    return path


def _direct(model, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, ...]:
    """pool, fc and softmax scores of one image's regions, one forward pass, float32."""
    regions = warp_regions(image, boxes, model.input_size, model.padding, tuple(255 * m for m in model.mean))
    with torch.inference_mode():
        pool, fc = model.forward_features(to_tensor_batch(regions, model.mean, model.std))
        scores = torch.softmax(model.classifier(fc), dim=1)
    return pool.numpy(), fc.numpy(), scores.numpy()


def _close(stored: np.ndarray, direct: np.ndarray) -> None:
    """Equal within float16 rounding (relative 2^-11) plus a margin for other kernel blockings."""
    scale = float(np.abs(direct).max()) or 1.0
    np.testing.assert_allclose(stored.astype(np.float32), direct, rtol=2e-3, atol=2e-3 * scale)


# --- pieces --------------------------------------------------------------------------------------


def test_row_buffer_takes_across_parts():
    empty = {"fc": np.zeros((0, 2), np.float16), "scores": np.zeros((0, 3), np.float32)}
    buffer = RowBuffer(empty)
    buffer.add({"fc": np.arange(6, dtype=np.float16).reshape(3, 2), "scores": np.zeros((3, 3), np.float32)})
    buffer.add({"fc": np.arange(6, 10, dtype=np.float16).reshape(2, 2), "scores": np.ones((2, 3), np.float32)})
    none = buffer.take(0)
    assert none["fc"].shape == (0, 2) and none["fc"].dtype == np.float16
    first = buffer.take(2)
    assert first["fc"].tolist() == [[0, 1], [2, 3]]
    spanning = buffer.take(2)  # the rest of part 1 and the start of part 2
    assert spanning["fc"].tolist() == [[4, 5], [6, 7]] and spanning["scores"][:, 0].tolist() == [0, 1]
    assert buffer.take(1)["fc"].tolist() == [[8, 9]] and not buffer.parts


def test_chunks_span_images_and_match_per_image_warps(cfg):
    split = cfg.data.train_split
    with PerImageReader([layout.index_file(split)]) as index, \
            PerImageReader([layout.proposals_shard(split, 0)]) as props:
        images = shard_images(index, props, with_gt=True)
        counts = props.counts() + index.counts()[images.positions]
        assert images.offsets.tolist() == [0, *np.cumsum(counts).tolist()]
        mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
        batch = next(b for b in (4, 5, 7) if images.num_regions % b)  # the last chunk is short
        chunks = RegionChunks(images, batch, 32, 3, mean, std)
        assert len(chunks) == -(-images.num_regions // batch) > len(images.image_ids)
        got = torch.cat([chunks[k] for k in range(len(chunks))])
        assert chunks[0].is_contiguous(memory_format=torch.channels_last)
        expected = []
        for i in range(len(images.image_ids)):
            boxes = read_regions(images, index, props, i)["boxes"]
            expected.append(warp_regions(load_image(images.paths[i]), boxes, 32, 3, tuple(255 * m for m in mean)))
        assert torch.equal(got, to_tensor_batch(np.concatenate(expected), mean, std))


# --- the stage -----------------------------------------------------------------------------------


def test_train_split_cache_with_the_finetuned_model(cfg):
    split = cfg.data.train_split
    out = _run(cfg, split, layout.features_dir("rcnn", split) / "shard-0.h5", model="finetuned", batch_size=7,
               compression=4)
    model = load_model(layout.FINETUNED_MODEL)
    with PerImageReader([layout.index_file(split)]) as index, \
            PerImageReader([layout.proposals_shard(split, 0)]) as props, h5py.File(out) as f:
        classes = json.loads(f.attrs["classes"])
        num_classes = len(classes)
        assert classes == model.classes and f.attrs["recipe"] == "rcnn" and f.attrs["model"] == "finetuned"
        assert (f.attrs["split"], f.attrs["shard_index"], f.attrs["num_shards"]) == (split, 0, 1)
        assert (f.attrs["pool_dim"], f.attrs["fc_dim"]) == (model.pool_dim, model.fc_dim) == (1792, 1280)
        assert (f.attrs["input_size"], f.attrs["padding"]) == (model.input_size, model.padding) == (64, 7)
        assert json.loads(f.attrs["params"])["features"]["batch_size"] == 7
        inputs = json.loads(f.attrs["inputs"])
        assert set(inputs) == {"index", "proposals", "model"}
        m = int(f["offsets"][-1])
        expected = {"boxes": ((m, 4), np.float32), "gt_label": ((m,), np.int32), "iou": ((m, num_classes), np.float32),
                    "pool": ((m, 1792), np.float16), "fc": ((m, 1280), np.float16),
                    "scores": ((m, num_classes + 1), np.float32)}
        for name, (shape, dtype) in expected.items():
            assert f[name].shape == shape and f[name].dtype == dtype, name
        for name in ("pool", "fc", "scores"):
            assert f[name].chunks == (CHUNK_ROWS, f[name].shape[1]) and f[name].compression == "gzip"
        assert f["widths"].dtype == np.int32 and list(f["image_ids"].asstr()[:]) == props.image_ids
        np.testing.assert_allclose(f["scores"][:].sum(axis=1), 1, rtol=1e-5)

        with PerImageReader([out]) as cache:
            for i, image_id in enumerate(props.image_ids):
                j = index.position(image_id)
                gt_boxes, gt_labels = index.rows("gt_boxes", j), index.rows("gt_labels", j)
                boxes, label = cache.rows("boxes", i), cache.rows("gt_label", i)
                k = len(props.rows("boxes", i))
                # proposals in order, then every ground-truth box with its class
                assert np.array_equal(boxes, np.concatenate([props.rows("boxes", i), gt_boxes]))
                assert (label[:k] == -1).all() and np.array_equal(label[k:], gt_labels) and len(gt_labels)
                assert np.array_equal(cache.rows("iou", i), class_iou(boxes, gt_boxes, gt_labels, num_classes))
                for name in ("widths", "heights"):
                    assert cache.value(name, i) == index.value(name, j)
                start, stop = f["offsets"][i], f["offsets"][i + 1]
                assert np.array_equal(cache.rows("fc", i), f["fc"][start:stop])
            # one image read back equals a forward pass of its own warped regions alone
            image = load_image(Path(index.attrs["data_root"]) / index.value("paths", j))
            pool, fc, scores = _direct(model, image, boxes)
            _close(cache.rows("pool", i), pool)
            _close(cache.rows("fc", i), fc)
            np.testing.assert_allclose(cache.rows("scores", i), scores, atol=1e-3)
    timing = runs.read(out)
    assert timing["images"] == len(props.image_ids) and timing["regions"] == m and timing["regions_per_second"] > 0


def test_test_split_has_proposals_only_and_feature_set_reads_both_shards(cfg, in_process):
    split = cfg.data.test_split
    for shard in range(2):
        _run(cfg, split, layout.features_dir("rcnn", split) / f"shard-{shard}.h5", shard=shard)
    with FeatureSet("rcnn", split, 2) as cache, PerImageReader.sharded(layout.proposals_dir(split), 2) as props:
        assert cache.image_ids == props.image_ids and cache.dim("pool") == 1792
        assert cache.attrs["model"] == "imagenet" and cache.attrs["input_size"] == cfg.finetune.input_size
        assert np.array_equal(cache.counts(), props.counts())
        for i in range(len(cache)):
            assert (cache.rows("gt_label", i) == -1).all()
            assert np.array_equal(cache.rows("boxes", i), props.rows("boxes", i))


def test_deterministic_and_independent_of_batch_size_and_workers(cfg, monkeypatch):
    split = cfg.data.test_split
    a = _run(cfg, split, "a.h5", num_workers=2)  # batch 5: chunks span images, the last one is short
    _in_process(monkeypatch)
    b = _run(cfg, split, "b.h5")
    assert a.read_bytes() == b.read_bytes()  # warped by two spawned workers or in this process
    whole = _run(cfg, split, "whole.h5", batch_size=64)  # every region in one pass
    # one region per pass, float32, uncompressed
    single = _run(cfg, split, "single.h5", batch_size=1, precision="float32", compression=0)
    with PerImageReader([a]) as fa, PerImageReader([whole]) as fw, PerImageReader([single]) as fs:
        assert fa.counts().sum() % 5 and fa.counts().sum() < 64
        for i in range(len(fw)):
            assert np.array_equal(fa.rows("boxes", i), fw.rows("boxes", i))
            assert np.array_equal(fs.rows("boxes", i), fw.rows("boxes", i))
            for name in ("pool", "fc"):
                assert fs.rows(name, i).dtype == np.float32
                _close(fa.rows(name, i), fw.rows(name, i).astype(np.float32))
                _close(fs.rows(name, i), fw.rows(name, i).astype(np.float32))
    with h5py.File(single) as f:
        assert f["fc"].compression is None


def _rewrite_proposals(split: str, shard: int, edit) -> None:
    """Replace the boxes of a proposal shard by ``edit(i, boxes)``, keeping its attributes."""
    path = layout.proposals_shard(split, shard)
    with PerImageReader([path]) as props:
        attrs = dict(props.attrs)
        rows = [(image_id, edit(i, props.rows("boxes", i))) for i, image_id in enumerate(props.image_ids)]
    for key in ("format_version", "row_datasets", "image_datasets"):
        attrs.pop(key)
    with create_per_image(path, proposals.ROWS, attrs) as writer:
        for image_id, boxes in rows:
            writer.append(image_id, {"boxes": boxes})


def test_images_without_proposals_and_degenerate_boxes(cfg, in_process):
    split = cfg.data.test_split
    degenerate = np.array([[10, 10, 10, 30], [5, 5, 4, 4]], np.float32)  # zero width; inverted
    _rewrite_proposals(split, 0, lambda i, boxes: boxes[:0] if i == 0 else np.concatenate([boxes, degenerate]))
    out = _run(cfg, split, "out.h5", batch_size=4)
    with PerImageReader([out]) as cache:
        counts = cache.counts()
        assert counts[0] == 0 and counts[1] >= 2 and len(cache) == 2
        assert cache.rows("fc", 0).shape == (0, 1280) and cache.rows("scores", 0).shape[0] == 0
        last = cache.rows("fc", 1)[-2:]
        assert np.isfinite(last.astype(np.float32)).all()


def test_empty_shard(cfg):
    split = cfg.data.test_split
    shards = 8  # more shards than the 4 test images: shard 0 has none
    proposals.run(cfg.proposals, "raise", split, 0, shards, layout.proposals_shard(split, 0), num_workers=1)
    params = dataclasses.replace(cfg.features, model="imagenet")
    features.run(params, _finetune(cfg), split, 0, shards, cfg.data.train_split, Path("empty.h5"), num_workers=1)
    with h5py.File("empty.h5") as f:
        assert len(f["image_ids"]) == 0 and f["fc"].shape == (0, 1280) and f["widths"].shape == (0,)
    assert runs.read(Path("empty.h5"))["regions"] == 0


def test_classes_of_another_dataset_are_a_clear_error(cfg):
    saved = torch.load(layout.FINETUNED_MODEL, weights_only=True)
    saved["classes"] = saved["classes"][::-1]
    torch.save(saved, layout.FINETUNED_MODEL)
    with pytest.raises(FeatureError, match="fine-tuned for classes .* but the index has"):
        _run(cfg, cfg.data.test_split, "out.h5", model="finetuned")
    assert not Path("out.h5").exists()


def test_stale_proposals_are_a_clear_error(cfg):
    split = cfg.data.test_split
    params = dataclasses.replace(cfg.features, model="imagenet")
    with pytest.raises(ArtifactError, match=r"written as shard 0 of 2, expected shard 0 of 3 \(stale artifact; rerun the proposals stage\)"):
        features.run(params, _finetune(cfg), split, 0, 3, cfg.data.train_split, Path("out.h5"), num_workers=1)
    attrs = {"stage": "proposals", "split": split, "shard_index": 0, "num_shards": 2}
    with create_per_image(layout.proposals_shard(split, 0), proposals.ROWS, attrs) as writer:
        writer.append("not_in_the_index", {"boxes": np.zeros((1, 4), np.float32)})
    with pytest.raises(ArtifactError, match=r"\['not_in_the_index'\] are not in .*rerun the proposals stage"):
        features.run(params, _finetune(cfg), split, 0, 2, cfg.data.train_split, Path("out.h5"), num_workers=1)
    assert not Path("out.h5").exists()
