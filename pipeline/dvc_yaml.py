"""``dvc.yaml``, generated from the stage table: ``python -m pipeline dvc-yaml > dvc.yaml`` (``make dvc.yaml``).

Each table entry becomes one DVC stage (a ``matrix`` stage when it fans out)
calling ``python -m stages <name>``, with the entry's params keys, its input
artifacts, and its code files: the import closure of its module and of the
argument binding (:mod:`stages.core.stage`). Paths and fan-out values are DVC
templates over ``params.yaml``, so editing a parameter needs no regeneration,
with one exception: a stage whose recipes are a subset of ``detect.recipes``
(the feature recipes of ``svm``, the Fast R-CNN models of ``fast_rcnn_train``)
has them spelled out, because DVC templates cannot filter a list; ``make run``
regenerates the file, and a stage run on a stale one stops with a message
(:func:`check_recipes`). Editing the table needs regeneration too (a test fails
while the committed file is stale). A stage with no instance is left out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from stages.core.config import Config, load_config
from stages.core.errors import PipelineError
from stages.core.provenance import PACKAGE_DIR, code_files
from stages.core.stage import FAN_OUT, Output, Refs, Stage, fan_out_values
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


class StaleDvcYaml(PipelineError, RuntimeError):
    """``dvc.yaml`` spells out recipes that ``params.yaml`` no longer enables, or misses some it does."""


def _matrix(stage: Stage, cfg: Config) -> dict[str, Any]:
    matrix: dict[str, Any] = {}
    for dim in stage.fan_out:
        key = FAN_OUT[dim]
        if dim == "recipe" and stage.derived_recipes:
            matrix[dim] = list(fan_out_values(cfg, stage, dim))
        else:
            matrix[dim] = ["${data.train_split}", "${data.test_split}"] if key == "data.splits" else f"${{{key}}}"
    return matrix


def _output_entry(out: Output) -> str | dict[str, Any]:
    if out.kind == "out":
        return str(out.path)
    options: dict[str, Any] = {"cache": False}
    if out.x:
        options["x"] = out.x
    return {str(out.path): options}


def stage_entry(stage: Stage, cfg: Config) -> dict[str, Any]:
    refs = Refs.templates(stage.fan_out)
    entry: dict[str, Any] = {}
    if stage.fan_out:
        entry["matrix"] = _matrix(stage, cfg)
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


def _has_instances(stage: Stage, cfg: Config) -> bool:
    return stage.needed(cfg) and (not stage.derived_recipes or bool(fan_out_values(cfg, stage, "recipe")))


def _top_level_plots(cfg: Config) -> list[dict[str, Any]]:
    """``dvc plots show``'s combined figures: each plot output that names its y columns."""
    figures = []
    for stage in (s for s in TABLE if _has_instances(s, cfg)):
        for out in stage.outputs(Refs.templates(stage.fan_out)).values():
            if out.kind == "plots" and out.y:
                figures.append({out.title or str(out.path): {"x": out.x, "y": {str(out.path): list(out.y)}}})
    return figures


def generate(cfg: Config | None = None) -> str:
    """The ``dvc.yaml`` of the table and of ``cfg`` (default: ``params.yaml`` of the working directory)."""
    cfg = cfg or load_config()
    stages = {stage.name: stage_entry(stage, cfg) for stage in TABLE if _has_instances(stage, cfg)}
    return HEADER + yaml.safe_dump({"stages": stages, "plots": _top_level_plots(cfg)}, sort_keys=False, width=120)


def write(path: Path = Path("dvc.yaml")) -> None:
    path.write_text(generate())


def check_recipes(cfg: Config, path: Path = Path("dvc.yaml")) -> None:
    """Raise :class:`StaleDvcYaml` unless ``path`` spells out every stage's recipes as ``cfg`` enables them."""
    if not path.is_file():
        return
    written = yaml.safe_load(path.read_text()).get("stages", {})
    for stage in (s for s in TABLE if s.derived_recipes):
        listed = (written.get(stage.name) or {}).get("matrix", {}).get("recipe", [])
        expected = list(fan_out_values(cfg, stage, "recipe"))
        if listed != expected:
            raise StaleDvcYaml(f"{path} runs {stage.name} for recipes {listed}, but detect.recipes now needs "
                               f"{expected}: run `make dvc.yaml` (make run does it for you)")
