"""``python -m stages inspect PATH``: a readable summary of any artifact.

HDF5 files: every dataset with shape, dtype, compression and stored size, the
attributes (parameters, provenance) and, for per-image artifacts, the number of
images and rows per image; feature caches also get bytes per region against
float32 uncompressed. Model files (``.pt``): their metadata and tensor shapes.
Folders: their files, and the sharded datasets in them as one. JSON and CSV
files: their content.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from stages.core.errors import PipelineError
from stages.core.store import PerImageReader

MAX_ATTR_CHARS = 400


def describe(path: Path) -> str:
    if not path.exists():
        raise PipelineError(f"{path}: no such artifact")
    if path.is_dir():
        return _describe_dir(path)
    if h5py.is_hdf5(path):
        return _describe_h5(path)
    if path.suffix == ".pt":
        return _describe_model(path)
    text = path.read_text(errors="replace")
    if path.suffix == ".json":
        try:
            return json.dumps(json.loads(text), indent=2)
        except ValueError as exc:
            raise PipelineError(f"{path}: not valid JSON ({exc})") from None
    return text if len(text) < 4000 else text[:4000] + f"\n... ({len(text)} characters)"


def _describe_dir(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    lines = [f"{path}/: {len(files)} files, {_size(sum(p.stat().st_size for p in files))}"]
    lines += [f"  {p.relative_to(path)}  {_size(p.stat().st_size)}" for p in files[:30]]
    if len(files) > 30:
        lines.append(f"  ... and {len(files) - 30} more")
    shards = sorted(path.glob("shard-*.h5"), key=lambda p: (len(p.name), p.name))  # shard-2 before shard-10
    if shards:
        with PerImageReader(shards) as reader:
            lines.append(f"as one dataset over {len(shards)} shard(s): " + _per_image_summary(reader))
            lines.append(_feature_summary(reader))
    return "\n".join(line for line in lines if line)


def _describe_h5(path: Path) -> str:
    lines = [f"{path}: HDF5, {_size(path.stat().st_size)}"]
    with h5py.File(path, "r") as f:
        lines.append("datasets:")
        f.visititems(lambda name, obj: lines.append(_describe_dataset(name, obj)) if isinstance(obj, h5py.Dataset) else None)
        lines.append("attributes:")
        lines += [f"  {key} = {_short(value)}" for key, value in sorted(f.attrs.items())]
        per_image = "offsets" in f and "image_ids" in f
    if per_image:
        with PerImageReader([path]) as reader:
            lines.append("per image: " + _per_image_summary(reader))
            lines.append(_feature_summary(reader))
    return "\n".join(line for line in lines if line)


def _describe_model(path: Path) -> str:
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a file that is not a checkpoint
        raise PipelineError(f"{path}: not a model file of this pipeline ({exc})") from None
    state = saved.pop("state_dict", {}) if isinstance(saved, dict) else {}
    lines = [f"{path}: model file, {_size(path.stat().st_size)}"]
    lines += [f"  {key} = {_short(json.dumps(value, sort_keys=True, default=str))}" for key, value in sorted(saved.items())]
    lines.append(f"state_dict: {len(state)} tensors, {sum(t.numel() for t in state.values()):,} values")
    lines += [f"  {key}  {tuple(t.shape)}  {t.dtype}" for key, t in list(state.items())[-4:]]
    return "\n".join(lines)


def _feature_summary(reader: PerImageReader) -> str:
    """Bytes per region of the feature datasets, stored vs float32 uncompressed."""
    rows = int(reader.counts().sum())
    names = [n for n in ("pool", "fc") if n in reader._files[0]]
    if not rows or not names:
        return ""
    stored = sum(f[n].id.get_storage_size() for f in reader._files for n in names)
    dims = {n: int(reader._files[0][n].shape[1]) for n in names}
    float32 = 4 * sum(dims.values())
    return (f"features {', '.join(f'{n} {d}-d' for n, d in dims.items())}: {stored / rows:.0f} bytes per region "
            f"stored vs {float32} float32 uncompressed ({stored / rows / float32:.2f}x)")


def _describe_dataset(name: str, dataset: h5py.Dataset) -> str:
    logical = dataset.size * dataset.dtype.itemsize
    stored = dataset.id.get_storage_size()
    ratio = f", ratio {logical / stored:.2f}x" if stored and dataset.compression else ""
    storage = f"{dataset.compression or 'uncompressed'}, chunks {dataset.chunks}" if dataset.chunks else "contiguous"
    return f"  {name}  shape {dataset.shape}  {dataset.dtype}  {storage}, stored {_size(stored)}{ratio}"


def _per_image_summary(reader: PerImageReader) -> str:
    counts = reader.counts()
    if not len(counts):
        return "0 images"
    head = ", ".join(reader.image_ids[:3])
    return (
        f"{len(counts)} images ({head}{', ...' if len(counts) > 3 else ''}), rows per image "
        f"min {counts.min()} / mean {counts.mean():.1f} / max {counts.max()}, {int(np.sum(counts))} rows"
    )


def _short(value: object) -> str:
    text = value.decode() if isinstance(value, bytes) else str(value)
    try:
        text = json.dumps(json.loads(text), sort_keys=True)
    except (ValueError, TypeError):
        pass
    return text if len(text) <= MAX_ATTR_CHARS else text[:MAX_ATTR_CHARS] + f"... ({len(text)} chars)"


def _size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")
