"""The pipeline as Luigi tasks, built from the stage table: ``luigi --module pipeline RunAll --local-scheduler``.

One task class per entry of :data:`stages.table.TABLE` (``Proposals(split,
shard)``, ``Svm(recipe)``, ...), with one Luigi parameter per fan-out
dimension. A task requires the instances whose outputs are its inputs (by
path, as DVC links stages), runs the stage in-process through
:func:`stages.core.stage.call` (the same binding ``python -m stages`` uses),
and records it in ``dvc.lock`` (:mod:`pipeline.record`).

Completeness is the record's: a task is complete when everything it requires
is complete and DVC's check of its stage instance finds nothing changed. A
task whose inputs were rewritten with identical content finds its instance
current again when its turn comes, and runs nothing.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, ClassVar

import luigi

from pipeline.record import DvcRecord
from stages.core.config import RECIPES, Config, load_config
from stages.core.errors import PipelineError
from stages.core.stage import Refs, Stage, address, call, instances
from stages.table import TABLE

RECORD = DvcRecord()
_complete: dict[str, bool] = {}  # task_ids found complete, forgotten whenever a task of this process runs


@functools.lru_cache(maxsize=1)
def config() -> Config:
    """``params.yaml`` of the working directory, read once per process."""
    return load_config()


FAN_OUT_PARAMETERS = {
    "split": lambda: luigi.Parameter(),
    "shard": lambda: luigi.IntParameter(),
    "recipe": lambda: luigi.ChoiceParameter(choices=RECIPES),
}


class StageTask(luigi.Task):
    """One instance of a stage of the table."""

    stage: ClassVar[Stage]

    @property
    def item(self) -> dict[str, Any]:
        return {dim: getattr(self, dim) for dim in self.stage.fan_out}

    @property
    def address(self) -> str:
        return address(self.stage, self.item)

    def requires(self) -> list[luigi.Task]:
        inputs = self.stage.inputs(Refs.of(config(), self.item)).values()
        return [TASKS[stage.name](**item) for stage, item in producers_of([Path(p) for p in inputs])]

    def output(self) -> list[luigi.LocalTarget]:
        return [luigi.LocalTarget(str(out.path)) for out in self.stage.outputs(Refs.of(config(), self.item)).values()]

    def complete(self) -> bool:
        """Everything required is complete and the record finds this instance current. Only True is
        remembered: a task run by another worker process completes behind this process's back."""
        if self.task_id not in _complete:
            if not (all(task.complete() for task in luigi.task.flatten(self.requires()))
                    and RECORD.is_current(self.address)):
                return False
            _complete[self.task_id] = True
        return True

    def run(self) -> None:
        if RECORD.is_current(self.address):
            print(f"pipeline: {self.address} is current (its inputs came out unchanged)", flush=True)
        else:
            print(f"pipeline: running {self.address}", flush=True)
            call(self.stage, config(), self.item)
            RECORD.commit(self.address)
        _complete.clear()


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


@functools.lru_cache(maxsize=1)
def _outputs_by_instance() -> tuple[tuple[Stage, dict[str, Any], tuple[Path, ...]], ...]:
    cfg = config()
    return tuple((stage, item, tuple(Path(o.path) for o in stage.outputs(Refs.of(cfg, item)).values()))
                 for stage, item in instances(TABLE, cfg))


def producers_of(paths: list[Path]) -> list[tuple[Stage, dict[str, Any]]]:
    """The stage instances whose outputs are, contain, or lie inside one of ``paths``."""
    return [(stage, item) for stage, item, outputs in _outputs_by_instance()
            if any(_overlap(p, o) for p in paths for o in outputs)]


def stale_upstream(paths: list[Path]) -> list[str]:
    """The stage instances that write ``paths`` or anything they are computed from and that the record does
    not find current (changed params, code or inputs, or a missing output), upstream first. A path that no
    stage of the table writes under ``params.yaml`` is a :class:`PipelineError`."""
    cfg = config()
    for path in paths:
        if not producers_of([path]):
            raise PipelineError(f"{path}: no stage writes it under params.yaml (is its recipe in detect.recipes? "
                                "add it, then make dvc.yaml and dvc repro)")
    upstream: set[str] = set()
    todo = producers_of(paths)
    while todo:
        stage, item = todo.pop()
        if address(stage, item) not in upstream:
            upstream.add(address(stage, item))
            todo += producers_of([Path(p) for p in stage.inputs(Refs.of(cfg, item)).values()])
    order = [address(stage, item) for stage, item in instances(TABLE, cfg)]
    return [name for name in order if name in upstream and not RECORD.is_current(name)]


def _task_class(stage: Stage) -> type[StageTask]:
    name = "".join(part.capitalize() for part in stage.name.split("_"))
    body = {"stage": stage, "__doc__": stage.help, "__module__": __name__,
            **{dim: FAN_OUT_PARAMETERS[dim]() for dim in stage.fan_out}}
    return type(name, (StageTask,), body)


TASKS: dict[str, type[StageTask]] = {stage.name: _task_class(stage) for stage in TABLE}
globals().update({cls.__name__: cls for cls in TASKS.values()})


def timing_key(stage: Stage, item: dict[str, Any], cfg: Config) -> str:
    """The name the benchmarks file an instance's seconds under: its task family (``FastRcnnTrain``) with
    ``:train`` or ``:test`` for a split, else ``:<recipe>``; the shards of a split add up under one key."""
    key = TASKS[stage.name].get_task_family()
    if "split" in stage.fan_out:
        return key + (":train" if item["split"] == cfg.data.train_split else ":test")
    return f"{key}:{item['recipe']}" if "recipe" in stage.fan_out else key


class RunAll(luigi.WrapperTask):
    """Every stage instance of the table, as ``dvc repro`` runs every stage of ``dvc.yaml``."""

    def requires(self) -> list[luigi.Task]:
        return [TASKS[stage.name](**item) for stage, item in instances(TABLE, config())]
