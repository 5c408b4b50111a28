"""``dvc.yaml``, generated from the stage table: ``python -m pipeline dvc-yaml > dvc.yaml`` (``make dvc.yaml``).

Each table entry becomes one DVC stage (a ``matrix`` stage when it fans out)
calling ``python -m stages <name>``, with the entry's params keys, its input
artifacts, and its code files: the import closure of its module and of the
argument binding (:mod:`stages.core.stage`). Paths and fan-out values are DVC
templates over ``params.yaml``, so editing a parameter needs no regeneration;
editing the table does (a test fails while the committed file is stale).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from stages.core.provenance import PACKAGE_DIR, code_files
from stages.core.stage import FAN_OUT, Output, Refs, Stage
from stages.table import TABLE

HEADER = """\
# GENERATED from the stage table (stages/table.py) by `make dvc.yaml`; do not edit by hand.
# Each stage runs `python -m stages <name>`, the same entry point the Luigi tasks call
# (luigi --module pipeline RunAll). Both orchestrators record completed work in dvc.lock.
"""
REPO = PACKAGE_DIR.parent
BINDING_MODULE = "core.stage"


def stage_code_files(stage: Stage) -> list[str]:
    """Repository-relative source files the stage's outputs depend on."""
    files = set(code_files(stage.module)) | set(code_files(BINDING_MODULE))
    return sorted(str(p.relative_to(REPO)) for p in files)


def _command(stage: Stage) -> str:
    options = " ".join(f"--{dim} ${{item.{dim}}}" for dim in stage.fan_out)
    return f"python -m stages {stage.name} {options}".rstrip()


def _matrix(stage: Stage) -> dict[str, Any]:
    matrix: dict[str, Any] = {}
    for dim in stage.fan_out:
        key = FAN_OUT[dim]
        matrix[dim] = ["${data.train_split}", "${data.test_split}"] if key == "data.splits" else f"${{{key}}}"
    return matrix


def _output_entry(out: Output) -> str | dict[str, Any]:
    if out.kind == "out":
        return str(out.path)
    options: dict[str, Any] = {"cache": False}
    if out.x:
        options["x"] = out.x
    return {str(out.path): options}


def stage_entry(stage: Stage) -> dict[str, Any]:
    refs = Refs.templates(stage.fan_out)
    entry: dict[str, Any] = {}
    if stage.fan_out:
        entry["matrix"] = _matrix(stage)
    entry["cmd"] = _command(stage)
    inputs = list(dict.fromkeys(str(p) for p in stage.inputs(refs).values()))
    entry["deps"] = inputs + stage_code_files(stage)
    if stage.params:
        entry["params"] = list(stage.params)
    outputs = list(stage.outputs(refs).values())
    for kind in ("outs", "metrics", "plots"):
        chosen = [_output_entry(o) for o in outputs if (o.kind == "out") == (kind == "outs") and
                  (kind == "outs" or o.kind == kind)]
        if chosen:
            entry[kind] = chosen
    return entry


def _top_level_plots() -> list[dict[str, Any]]:
    """``dvc plots show``'s combined figures: each plot output that names its y columns."""
    figures = []
    for stage in TABLE:
        for out in stage.outputs(Refs.templates(stage.fan_out)).values():
            if out.kind == "plots" and out.y:
                figures.append({out.title or str(out.path): {"x": out.x, "y": {str(out.path): list(out.y)}}})
    return figures


def generate() -> str:
    document = {"stages": {stage.name: stage_entry(stage) for stage in TABLE}, "plots": _top_level_plots()}
    return HEADER + yaml.safe_dump(document, sort_keys=False, width=120)


def write(path: Path = REPO / "dvc.yaml") -> None:
    path.write_text(generate())
