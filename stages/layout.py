"""Where every artifact lives, relative to the repository root.

``dvc.yaml`` spells the same paths out literally; a test checks that it agrees
with this module and with the Luigi tasks in ``pipeline/``.
"""
from __future__ import annotations

from pathlib import Path

from stages.store import shard_path

CACHE = Path("features_cache")
SYNTHETIC = CACHE / "synthetic"
INDEX = CACHE / "index"
PROPOSALS = CACHE / "proposals"
REPORTS = CACHE / "reports"
PROPOSAL_METRICS = REPORTS / "proposals.json"
FINETUNED_MODEL = CACHE / "finetune" / "model.pt"
FINETUNE_CURVE = REPORTS / "finetune_curve.csv"


def index_file(split: str) -> Path:
    return INDEX / f"{split}.h5"


def proposals_dir(split: str) -> Path:
    return PROPOSALS / split


def proposals_shard(split: str, shard: int) -> Path:
    return shard_path(proposals_dir(split), shard)


def timing_file(shard_file: Path) -> Path:
    """Wall-clock figures of a shard, kept apart so the HDF5 file itself stays byte-identical."""
    return shard_file.with_suffix(".timing.json")


def recall_curve(split: str) -> Path:
    return REPORTS / f"recall_curve_{split}.csv"
