"""Helpers shared by the benchmarks: a scratch workspace laid out like the repository, the loop over the
default dataset and BCCD, and tables."""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from stages import index, synthetic
from stages.core import layout
from stages.core.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
BCCD = REPO.parent / "shared" / "datasets" / "BCCD"


class Workspace:
    """A temporary working directory holding a copy of params.yaml; artifacts go to its features_cache/."""

    def __enter__(self) -> "Workspace":
        self.folder = Path(tempfile.mkdtemp(prefix="rcnn-bench-"))
        shutil.copy(REPO / "params.yaml", self.folder)
        self.previous = os.getcwd()
        os.chdir(self.folder)
        return self

    def __exit__(self, *exc: object) -> None:
        os.chdir(self.previous)
        shutil.rmtree(self.folder, ignore_errors=True)

    def config(self) -> Config:
        return load_config()

    def index(self, cfg: Config) -> None:
        index.run(cfg.data, layout.INDEX, cfg.runtime.num_workers)


def on_datasets(measure: Callable[[str, Config], dict], bccd_name: str = "BCCD test") -> list[dict]:
    """``measure(name, cfg)`` in a fresh workspace on the generated default dataset, generated and
    indexed, then on BCCD (indexed, ``on_error: skip``) when ``../shared/datasets/BCCD`` exists."""
    rows = []
    with Workspace() as ws:
        cfg = ws.config()
        synthetic.run(cfg.synthetic, layout.SYNTHETIC)
        ws.index(cfg)
        rows.append(measure("generated default (test)", cfg))
    if BCCD.is_dir():
        with Workspace() as ws:
            cfg = ws.config()
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(BCCD), on_error="skip"))
            ws.index(cfg)
            rows.append(measure(bccd_name, cfg))
    else:
        print(f"BCCD not found at {BCCD}: skipped")
    return rows


def print_table(rows: list[dict]) -> None:
    """A markdown table, numbers to 3 significant figures (whole numbers from 100 up)."""
    if not rows:
        return
    header = list(rows[0])
    cells = [[_number(v) if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in cells:
        print("| " + " | ".join(row) + " |")


def _number(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
