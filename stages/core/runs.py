"""Run-to-run facts (wall and CPU seconds, throughput) of the artifact a stage wrote.

They differ on every run, so they live apart from every artifact, in
``features_cache/runs/<artifact path>.json``: no DVC output, no folder that
a stage depends on, not in git. They never decide whether work is complete.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.core.atomic import write_text
from stages.core.layout import CACHE, RUNS


def run_file(artifact: Path) -> Path:
    """Where the facts of ``artifact`` are kept: ``runs/<its path below features_cache>.json``
    (an artifact written elsewhere, by a test or a benchmark, keeps its whole path below ``runs/outside``)."""
    path = Path(artifact).absolute()
    cache = CACHE.absolute()
    relative = path.relative_to(cache) if path.is_relative_to(cache) else Path("outside", *path.parts[1:])
    return RUNS / relative.parent / f"{relative.name}.json"


def record(artifact: Path, facts: dict[str, Any]) -> None:
    write_text(run_file(artifact), json.dumps(facts, indent=2, sort_keys=True) + "\n")


def read(artifact: Path) -> dict[str, Any] | None:
    """The facts of the run that last wrote ``artifact``, or None when none were kept."""
    path = run_file(artifact)
    return json.loads(path.read_text()) if path.is_file() else None
