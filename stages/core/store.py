"""Per-image HDF5 artifacts: the one on-disk format of every per-image stage.

Layout of a file (all names are HDF5 datasets at the root):

``image_ids``  ``(n,)`` UTF-8 strings, the images in order
``offsets``    ``(n + 1,)`` int64; image ``i`` owns rows ``offsets[i]:offsets[i+1]``
row datasets   first dimension = ``offsets[-1]``, e.g. ``boxes (M, 4) float32``
image datasets first dimension = ``n``, e.g. ``widths (n,) int32``

Root attributes: ``format_version``, ``stage``, ``params`` (JSON), ``code_version``,
``inputs`` (JSON ``{name: sha256}``), ``row_datasets`` / ``image_datasets`` (JSON
lists) and stage-specific extras. Sharded stages write one file per shard
(``shard-0.h5``, ``shard-1.h5`` ...) with ``shard_index`` / ``num_shards`` attributes;
:class:`PerImageReader` presents the shards as one logical dataset.

Files are written under a temporary name, closed, reopened to verify, and only
then renamed into place (:mod:`stages.core.atomic`). No timestamps are stored, so the
same inputs give byte-identical files.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import h5py
import numpy as np

from stages.core import faults
from stages.core.atomic import atomic_path
from stages.core.errors import PipelineError

FORMAT_VERSION = 1
STRING = h5py.string_dtype("utf-8")


class ArtifactError(PipelineError, ValueError):
    """An artifact is missing, from another run, or not in the expected format."""


@dataclass(frozen=True)
class RowSpec:
    """One row dataset: per-row shape after the first dimension, dtype and storage options."""

    tail: tuple[int, ...]
    dtype: Any
    compression: str | None = None
    chunk_rows: int = 4096
    compression_opts: int | None = None  # e.g. the gzip level


@dataclass
class PerImageWriter:
    """Streams images into an open HDF5 file; call :meth:`append` per image, then :meth:`finish`.

    ``images`` declares the per-image datasets and their dtypes (``str`` for text),
    so that they exist with the right dtype even when there are no images.
    """

    file: h5py.File
    rows: Mapping[str, RowSpec]
    images: Mapping[str, Any] = field(default_factory=dict)
    image_ids: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=lambda: [0])
    per_image: dict[str, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.per_image = {name: [] for name in self.images}
        for name, spec in self.rows.items():
            self.file.create_dataset(
                name,
                shape=(0, *spec.tail),
                maxshape=(None, *spec.tail),
                dtype=spec.dtype,
                chunks=(spec.chunk_rows, *spec.tail),
                compression=spec.compression,
                compression_opts=spec.compression_opts,
                shuffle=spec.compression is not None,
            )

    def append(self, image_id: str, rows: Mapping[str, np.ndarray], **per_image: Any) -> None:
        """Add one image's rows (every row dataset, equal lengths) and its per-image values.

        Fault point ``image-written`` (:mod:`stages.core.faults`): the image is in the temporary file.
        """
        if set(rows) != set(self.rows) or set(per_image) != set(self.images):
            raise ValueError(
                f"{image_id}: got rows {sorted(rows)} and per-image values {sorted(per_image)}, "
                f"declared {sorted(self.rows)} and {sorted(self.images)}"
            )
        counts = {len(value) for value in rows.values()}
        if len(counts) > 1:
            raise ValueError(f"{image_id}: row datasets of unequal lengths {counts}")
        count = counts.pop() if counts else 0
        start = self.offsets[-1]
        for name, value in rows.items():
            dataset = self.file[name]
            dataset.resize(start + count, axis=0)
            dataset[start:] = value
        self.image_ids.append(image_id)
        self.offsets.append(start + count)
        for name, value in per_image.items():
            self.per_image[name].append(value)
        faults.reached("image-written")

    def finish(self) -> None:
        self.file.create_dataset("image_ids", data=np.array(self.image_ids, dtype=object), dtype=STRING)
        self.file.create_dataset("offsets", data=np.array(self.offsets, dtype=np.int64))
        for name, dtype in self.images.items():
            text = dtype is str
            data = np.array(self.per_image[name], dtype=object if text else dtype)
            self.file.create_dataset(name, data=data, dtype=STRING if text else dtype)
        self.file.attrs["row_datasets"] = json.dumps(sorted(self.rows))
        self.file.attrs["image_datasets"] = json.dumps(sorted(self.images))


@contextlib.contextmanager
def create_per_image(
    path: str | Path, rows: Mapping[str, RowSpec], attrs: Mapping[str, Any], images: Mapping[str, Any] | None = None
) -> Iterator[PerImageWriter]:
    """Write a per-image artifact atomically: it appears at ``path`` only once complete and verified."""
    with atomic_path(path, ".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            set_attrs(f, {"format_version": FORMAT_VERSION, **attrs})
            writer = PerImageWriter(f, rows, images or {})
            yield writer
            writer.finish()
        _verify(tmp)


def set_attrs(file: h5py.File, attrs: Mapping[str, Any]) -> None:
    """Root attributes: numbers and strings as they are, anything else as sorted JSON."""
    for key, value in attrs.items():
        scalar = isinstance(value, (str, int, float, np.integer, np.floating))
        file.attrs[key] = value if scalar else json.dumps(value, sort_keys=True)


def write_arrays(path: str | Path, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> None:
    """Write a small whole-array artifact (a trained model) atomically: datasets ``arrays``, root ``attrs``."""
    with atomic_path(path, ".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            for name, value in arrays.items():
                f.create_dataset(name, data=value)
            set_attrs(f, {"format_version": FORMAT_VERSION, **attrs})


def _verify(path: Path) -> None:
    """Reopen a finished file and check its index is consistent before it is renamed into place."""
    with h5py.File(path, "r") as f:
        offsets = f["offsets"][:]
        n = len(f["image_ids"])
        if len(offsets) != n + 1 or (np.diff(offsets) < 0).any():
            raise ArtifactError(f"{path}: inconsistent offsets")
        for name in json.loads(f.attrs["row_datasets"]):
            if f[name].shape[0] != offsets[-1]:
                raise ArtifactError(f"{path}: {name} has {f[name].shape[0]} rows, offsets say {offsets[-1]}")
        for name in json.loads(f.attrs["image_datasets"]):
            if f[name].shape[0] != n:
                raise ArtifactError(f"{path}: {name} has {f[name].shape[0]} entries for {n} images")


def shard_path(folder: str | Path, shard: int) -> Path:
    return Path(folder) / f"shard-{shard}.h5"


class PerImageReader:
    """Read-only view of one per-image artifact, or of all shards of one as a single dataset.

    Reading one image touches only that image's rows (and, for compressed
    datasets, only the chunks that hold them).
    """

    def __init__(self, paths: Sequence[str | Path]):
        if not paths:
            raise ArtifactError("no artifact files given")
        self.paths = [Path(p) for p in paths]
        for path in self.paths:
            if not path.is_file():
                raise ArtifactError(f"{path}: artifact not found (run its stage first)")
        self._files = [h5py.File(p, "r") for p in self.paths]
        self.image_ids: list[str] = []
        self._where: list[tuple[int, int]] = []
        self._offsets = []
        for k, f in enumerate(self._files):
            ids = [s.decode() if isinstance(s, bytes) else s for s in f["image_ids"][:]]
            self.image_ids += ids
            self._where += [(k, i) for i in range(len(ids))]
            self._offsets.append(f["offsets"][:])
        self._position = {image_id: i for i, image_id in enumerate(self.image_ids)}

    @classmethod
    def sharded(cls, folder: str | Path, num_shards: int) -> "PerImageReader":
        """Open shards ``0..num_shards-1`` of ``folder``, checking they belong together."""
        reader = cls([shard_path(folder, k) for k in range(num_shards)])
        reader.check_shards(num_shards)
        return reader

    def check_shards(self, num_shards: int, shards: Sequence[int] | None = None) -> None:
        """Raise :class:`ArtifactError` unless file ``k`` was written as shard ``shards[k]`` of ``num_shards``.

        ``shards`` defaults to ``0, 1, ...``: all shards, in order. A per-shard stage that opens its
        one input shard ``K`` alone checks it with ``check_shards(num_shards, [K])``.
        """
        expected = range(len(self._files)) if shards is None else shards
        for path, f, k in zip(self.paths, self._files, expected, strict=True):
            if (int(f.attrs.get("shard_index", -1)), int(f.attrs.get("num_shards", -1))) != (k, num_shards):
                rerun = f"the {f.attrs['stage']} stage" if "stage" in f.attrs else "its stage"
                raise ArtifactError(
                    f"{path}: written as shard {f.attrs.get('shard_index')} of {f.attrs.get('num_shards')}, "
                    f"expected shard {k} of {num_shards} (stale artifact; rerun {rerun})"
                )

    def __len__(self) -> int:
        return len(self.image_ids)

    def require_images_of(self, other: "PerImageReader") -> None:
        """Raise :class:`ArtifactError` unless this artifact holds exactly ``other``'s images, in order."""
        if self.image_ids != other.image_ids:
            raise ArtifactError(
                f"{self.paths[0].parent}: its images differ from those of {other.paths[0]} "
                "(stale artifact; rerun its stage)"
            )

    @property
    def attrs(self) -> h5py.AttributeManager:
        """The attributes of the first file (shards share their parameters and provenance)."""
        return self._files[0].attrs

    def json_attr(self, name: str) -> Any:
        return json.loads(self.attrs[name])

    def position(self, image_id: str) -> int:
        try:
            return self._position[image_id]
        except KeyError:
            raise KeyError(f"image {image_id!r} is not in {self.paths[0].parent}") from None

    def rows(self, name: str, i: int) -> np.ndarray:
        """The rows of dataset ``name`` that belong to image number ``i``."""
        k, local = self._where[i]
        start, stop = self._offsets[k][local], self._offsets[k][local + 1]
        return self._files[k][name][start:stop]

    def value(self, name: str, i: int) -> Any:
        """Per-image dataset ``name`` at image number ``i`` (strings decoded)."""
        k, local = self._where[i]
        value = self._files[k][name][local]
        return value.decode() if isinstance(value, bytes) else value

    def counts(self) -> np.ndarray:
        """``(n,)`` number of rows per image."""
        return np.concatenate([np.diff(o) for o in self._offsets])

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> "PerImageReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
