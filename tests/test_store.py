"""Per-image HDF5 artifacts: write, read back, shards as one dataset, atomicity, determinism."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from stages.core.atomic import OutputError
from stages.core.store import (
    FORMAT_VERSION,
    ArtifactError,
    PerImageReader,
    RowSpec,
    create_per_image,
    shard_path,
)

ROWS = {"boxes": RowSpec((4,), np.float32), "labels": RowSpec((), np.int32, compression="gzip", chunk_rows=8)}

# image id -> (boxes, labels); "empty" has no rows
IMAGES = {
    "a": (np.array([[0, 0, 10, 10], [1, 2, 3, 4]], np.float32), np.array([3, 1], np.int32)),
    "empty": (np.zeros((0, 4), np.float32), np.zeros(0, np.int32)),
    "c": (np.array([[5, 5, 6, 7]], np.float32), np.array([2], np.int32)),
}
ATTRS = {"stage": "test", "params": {"k": 1, "names": ["x", "y"]}, "count": 7, "ratio": 0.5}


def _write(path: Path, image_ids=tuple(IMAGES), attrs=ATTRS) -> None:
    with create_per_image(path, ROWS, attrs, {"paths": str, "widths": np.int32}) as writer:
        for image_id in image_ids:
            boxes, labels = IMAGES[image_id]
            writer.append(image_id, {"boxes": boxes, "labels": labels}, paths=f"{image_id}.jpg", widths=len(image_id))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "out.h5"
    _write(path)
    with PerImageReader([path]) as reader:
        assert len(reader) == 3
        assert reader.image_ids == ["a", "empty", "c"]
        np.testing.assert_array_equal(reader.counts(), [2, 0, 1])
        for i, (boxes, labels) in enumerate(IMAGES.values()):
            got = reader.rows("boxes", i)
            assert got.dtype == np.float32 and got.shape == boxes.shape
            np.testing.assert_array_equal(got, boxes)
            np.testing.assert_array_equal(reader.rows("labels", i), labels)
        assert reader.rows("labels", 1).shape == (0,)
        assert reader.value("paths", 2) == "c.jpg"  # strings decoded
        assert reader.value("widths", 1) == 5
        assert reader.position("c") == 2
        assert reader.json_attr("params") == {"k": 1, "names": ["x", "y"]}
        assert reader.attrs["stage"] == "test"
        assert reader.attrs["count"] == 7
        assert reader.attrs["ratio"] == 0.5
        assert reader.attrs["format_version"] == FORMAT_VERSION
        assert reader.json_attr("row_datasets") == ["boxes", "labels"]
        assert reader.json_attr("image_datasets") == ["paths", "widths"]
        with pytest.raises(KeyError, match="'nope'"):
            reader.position("nope")


def test_file_layout(tmp_path: Path) -> None:
    path = tmp_path / "out.h5"
    _write(path)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["offsets"][:], [0, 2, 2, 3])
        assert f["offsets"].dtype == np.int64
        assert f["boxes"].shape == (3, 4)
        assert f["labels"].compression == "gzip"
        assert f["boxes"].compression is None


def test_zero_images(tmp_path: Path) -> None:
    path = tmp_path / "out.h5"
    _write(path, image_ids=())
    with PerImageReader([path]) as reader:
        assert len(reader) == 0
        assert reader.counts().shape == (0,)


def test_shards_read_as_one_dataset(tmp_path: Path) -> None:
    _write(shard_path(tmp_path, 0), ["a", "empty"], {**ATTRS, "shard_index": 0, "num_shards": 2})
    _write(shard_path(tmp_path, 1), ["c"], {**ATTRS, "shard_index": 1, "num_shards": 2})
    assert shard_path(tmp_path, 1) == tmp_path / "shard-1.h5"
    with PerImageReader.sharded(tmp_path, 2) as reader:
        assert reader.image_ids == ["a", "empty", "c"]
        np.testing.assert_array_equal(reader.counts(), [2, 0, 1])
        # image 2 is the first image of the second file: its rows start at that file's offset 0
        np.testing.assert_array_equal(reader.rows("boxes", 2), [[5, 5, 6, 7]])
        np.testing.assert_array_equal(reader.rows("labels", 0), [3, 1])
        assert reader.value("paths", 2) == "c.jpg"
        assert reader.position("c") == 2


def test_stale_shard_is_rejected(tmp_path: Path) -> None:
    _write(shard_path(tmp_path, 0), ["a"], {**ATTRS, "shard_index": 0, "num_shards": 2})
    _write(shard_path(tmp_path, 1), ["c"], {**ATTRS, "shard_index": 1, "num_shards": 3})  # from a 3-shard run
    with pytest.raises(ArtifactError) as info:
        PerImageReader.sharded(tmp_path, 2)
    assert str(info.value).startswith(f"{shard_path(tmp_path, 1)}: written as shard 1 of 3, expected shard 1 of 2")
    assert "stale" in str(info.value)


def test_one_shard_opened_alone_is_checked_against_its_number(tmp_path: Path) -> None:
    _write(shard_path(tmp_path, 1), ["c"], {**ATTRS, "shard_index": 1, "num_shards": 2})
    with PerImageReader([shard_path(tmp_path, 1)]) as reader:
        reader.check_shards(2, [1])
        stale = r"written as shard 1 of 2, expected shard 1 of 3 \(stale artifact; rerun the test stage\)$"
        with pytest.raises(ArtifactError, match=stale):
            reader.check_shards(3, [1])
        with pytest.raises(ArtifactError, match="expected shard 0 of 2"):
            reader.check_shards(2)  # by default file k must be shard k


def test_unsharded_file_is_not_a_shard(tmp_path: Path) -> None:
    _write(shard_path(tmp_path, 0), ["a"])  # no shard attributes
    with pytest.raises(ArtifactError, match="expected shard 0 of 1"):
        PerImageReader.sharded(tmp_path, 1)


def test_missing_shard(tmp_path: Path) -> None:
    _write(shard_path(tmp_path, 0), ["a"], {**ATTRS, "shard_index": 0, "num_shards": 2})
    with pytest.raises(ArtifactError) as info:
        PerImageReader.sharded(tmp_path, 2)
    assert str(info.value) == f"{shard_path(tmp_path, 1)}: artifact not found (run its stage first)"


def test_missing_file_and_no_files(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="artifact not found"):
        PerImageReader([tmp_path / "missing.h5"])
    with pytest.raises(ArtifactError, match="no artifact files given"):
        PerImageReader([])


def test_exception_while_writing_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "out.h5"
    with pytest.raises(RuntimeError, match="boom"):
        with create_per_image(path, ROWS, ATTRS) as writer:
            writer.append("a", {"boxes": IMAGES["a"][0], "labels": IMAGES["a"][1]})
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_exception_while_writing_keeps_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "out.h5"
    _write(path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with create_per_image(path, ROWS, ATTRS):
            raise RuntimeError("boom")
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_append_checks_rows(tmp_path: Path) -> None:
    path = tmp_path / "out.h5"
    with pytest.raises(ValueError, match="declared"):
        with create_per_image(path, ROWS, ATTRS) as writer:
            writer.append("a", {"boxes": IMAGES["a"][0]})  # labels missing
    with pytest.raises(ValueError, match="unequal lengths"):
        with create_per_image(path, ROWS, ATTRS) as writer:
            writer.append("a", {"boxes": IMAGES["a"][0], "labels": np.zeros(3, np.int32)})
    assert list(tmp_path.iterdir()) == []


def test_same_content_gives_identical_bytes(tmp_path: Path) -> None:
    _write(tmp_path / "one.h5")
    _write(tmp_path / "two.h5")
    assert (tmp_path / "one.h5").read_bytes() == (tmp_path / "two.h5").read_bytes()


def test_written_file_is_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "out.h5"
    _write(path)
    assert path.stat().st_mode & 0o777 == 0o644


def test_unwritable_output_folder(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("a regular file, not a folder")
    with pytest.raises(OutputError, match="cannot create output folder"):
        _write(tmp_path / "afile" / "out.h5")


def test_attrs_are_json_for_containers(tmp_path: Path) -> None:
    path = tmp_path / "out.h5"
    _write(path)
    with h5py.File(path, "r") as f:
        assert json.loads(f.attrs["params"]) == {"k": 1, "names": ["x", "y"]}
        # sorted keys: the same dict always gives the same bytes
        assert f.attrs["params"] == '{"k": 1, "names": ["x", "y"]}'
