"""``python -m stages inspect``: readable summaries of HDF5 files, shard folders and JSON."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from stages.core.errors import PipelineError
from stages.core.store import RowSpec, create_per_image, shard_path
from stages.tools.describe import describe

ROWS = {"boxes": RowSpec((4,), np.float32, compression="gzip"), "labels": RowSpec((), np.int32)}
COUNTS = {"a": 2, "b": 0, "c": 1, "d": 5}


def _write(path: Path, ids: list[str], **extra) -> None:
    attrs = {"stage": "test", "params": {"k": 1}, **extra}
    with create_per_image(path, ROWS, attrs, {"paths": str}) as writer:
        for image_id in ids:
            n = COUNTS[image_id]
            writer.append(image_id, {"boxes": np.ones((n, 4), np.float32), "labels": np.zeros(n, np.int32)}, paths=f"{image_id}.jpg")


def test_describe_per_image_file(tmp_path: Path) -> None:
    path = tmp_path / "art.h5"
    _write(path, ["a", "b", "c", "d"])
    text = describe(path)
    lines = text.splitlines()
    assert lines[0].startswith(f"{path}: HDF5, ")
    assert lines[1] == "datasets:"
    datasets = {line.split()[0]: line for line in lines[2 : lines.index("attributes:")]}
    assert sorted(datasets) == ["boxes", "image_ids", "labels", "offsets", "paths"]
    assert "shape (8, 4)  float32  gzip, chunks" in datasets["boxes"]
    assert "ratio" in datasets["boxes"]
    assert "shape (8,)  int32  uncompressed, chunks" in datasets["labels"]
    assert "shape (5,)  int64  contiguous" in datasets["offsets"]
    assert "shape (4,)" in datasets["image_ids"]
    attributes = lines[lines.index("attributes:") + 1 : -1]
    assert "  stage = test" in attributes
    assert '  params = {"k": 1}' in attributes
    assert '  row_datasets = ["boxes", "labels"]' in attributes
    assert "  format_version = 1" in attributes
    # counts 2, 0, 1, 5: min 0, mean 8 / 4 = 2.0, max 5, 8 rows; only the first three ids are named
    assert lines[-1] == "per image: 4 images (a, b, c, ...), rows per image min 0 / mean 2.0 / max 5, 8 rows"


def test_describe_empty_per_image_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.h5"
    _write(path, [])
    assert describe(path).splitlines()[-1] == "per image: 0 images"


def test_describe_plain_hdf5_has_no_per_image_summary(tmp_path: Path) -> None:
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("weights", data=np.zeros((3, 2), np.float64))
        f.attrs["note"] = "x" * 500
    text = describe(path)
    assert "  weights  shape (3, 2)  float64  contiguous, stored 48 B" in text
    assert "  note = " + "x" * 400 + "... (500 chars)" in text
    assert "per image" not in text


def test_describe_shard_folder(tmp_path: Path) -> None:
    folder = tmp_path / "proposals"
    _write(shard_path(folder, 0), ["a", "b"], shard_index=0, num_shards=2)
    _write(shard_path(folder, 1), ["c"], shard_index=1, num_shards=2)
    (folder / "shard-0.timing.json").write_text("{}")
    (folder / ".hidden").write_text("not listed")
    lines = describe(folder).splitlines()
    assert lines[0].startswith(f"{folder}/: 3 files, ")
    assert [line.split()[0] for line in lines[1:4]] == ["shard-0.h5", "shard-0.timing.json", "shard-1.h5"]
    # counts 2, 0, 1: min 0, mean 1.0, max 2, 3 rows
    assert lines[4] == "as one dataset over 2 shard(s): 3 images (a, b, c), rows per image min 0 / mean 1.0 / max 2, 3 rows"
    assert len(lines) == 5


def test_describe_many_shards_in_numeric_order(tmp_path: Path) -> None:
    folder = tmp_path / "proposals"
    owner = {0: ["a"], 1: ["b"], 2: ["c"], 10: ["d"]}  # shards 3..9 are empty
    for k in range(11):
        _write(shard_path(folder, k), owner.get(k, []), shard_index=k, num_shards=11)
    # as text shard-10.h5 sorts before shard-2.h5, which would list a, b, d
    assert describe(folder).splitlines()[-1] == (
        "as one dataset over 11 shard(s): 4 images (a, b, c, ...), rows per image min 0 / mean 2.0 / max 5, 8 rows"
    )


def test_describe_json(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text('{"recall": {"0.5": 0.9}, "images": 3}')
    assert describe(path) == '{\n  "recall": {\n    "0.5": 0.9\n  },\n  "images": 3\n}'


def test_describe_text(tmp_path: Path) -> None:
    path = tmp_path / "curve.csv"
    path.write_text("k,recall\n1,0.5\n")
    assert describe(path) == "k,recall\n1,0.5\n"
    path.write_text("x" * 5000)
    assert describe(path) == "x" * 4000 + "\n... (5000 characters)"


def test_describe_missing_path(tmp_path: Path) -> None:
    with pytest.raises(PipelineError) as info:
        describe(tmp_path / "missing.h5")
    assert str(info.value) == f"{tmp_path / 'missing.h5'}: no such artifact"


def test_describe_json_round_trips(tmp_path: Path) -> None:
    data = {"b": [1, 2], "a": None}
    path = tmp_path / "x.json"
    path.write_text(json.dumps(data))
    assert json.loads(describe(path)) == data
