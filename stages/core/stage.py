"""A pipeline stage, declared once: what it fans out over, reads, writes and which ``run`` it calls.

The declarations themselves are the stage table (:mod:`stages.table`); this
module is the machinery every orchestrator shares:

* :class:`Refs` fills a stage's path functions, either with one instance's
  values (a run) or with DVC template strings (the generated ``dvc.yaml``);
* :func:`instances` expands the table over the configured splits, shards and
  recipes;
* :func:`arguments` binds a stage's ``run(...)`` parameters by name and type,
  so no per-stage glue code exists that a code version could miss: a
  parameter named like a fan-out dimension gets the instance's value, one
  named like an input or output gets its path, one annotated with a params
  dataclass gets that ``params.yaml`` section, the names in
  :data:`CONFIG_NAMES` get those keys, and the entry's ``constants`` their
  values (one module serving several entries: the steps of Faster R-CNN's
  alternating training).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from stages.core.config import Config
from stages.core.kernels import one_blas_thread, pin_cpu_kernels, require_pinned_blas, require_pinned_mkl

# fan-out dimension -> the params key listing its values
FAN_OUT = {"split": "data.splits", "shard": "sharding.shards", "recipe": "detect.recipes"}
# run() parameter name -> (attribute of the config it receives, the params keys that attribute reads)
CONFIG_NAMES = {
    "train_split": ("data.train_split", ("data.train_split",)),
    "test_split": ("data.test_split", ("data.test_split",)),
    "splits": ("data.splits", ("data.train_split", "data.test_split")),
    "on_error": ("data.on_error", ("data.on_error",)),
    "num_shards": ("sharding.num_shards", ("sharding",)),
    "num_workers": ("runtime.num_workers", ("runtime",)),
    "checkpoint_every": ("runtime.checkpoint_every", ("runtime",)),
}
# the params section that is no stage's dependency: how to run, never what
RUNTIME = "runtime"


@dataclass(frozen=True)
class Output:
    """One artifact a stage writes.

    ``kind``: ``out`` (DVC-cached), ``metrics`` or ``plots`` (small files kept
    in git). A plot may name its ``x`` column, and with ``y`` and ``title`` it
    also becomes one of ``dvc plots show``'s combined figures.
    """

    path: Path | str
    kind: Literal["out", "metrics", "plots"] = "out"
    x: str | None = None
    y: tuple[str, ...] = ()
    title: str | None = None


def metrics(path: Path | str) -> Output:
    return Output(path, "metrics")


def plot(path: Path | str, x: str | None = None, y: tuple[str, ...] = (), title: str | None = None) -> Output:
    return Output(path, "plots", x, y, title)


class Refs:
    """What a stage's paths may depend on: its instance's fan-out values and the dataset's names.

    Attributes ``split``, ``shard``, ``recipe`` exist only for the dimensions
    the stage fans out over (anything else is a declaration error), plus
    ``train_split``, ``test_split`` and ``data_root``.
    """

    def __init__(self, item: Mapping[str, Any], train_split: str, test_split: str, data_root: str) -> None:
        self._item = dict(item)
        self.train_split, self.test_split, self.data_root = train_split, test_split, data_root

    def __getattr__(self, name: str) -> Any:
        item = self.__dict__.get("_item", {})
        if name in item:
            return item[name]
        raise AttributeError(f"the stage does not fan out over {name!r}")

    @property
    def splits(self) -> tuple[str, str]:
        return (self.train_split, self.test_split)

    @classmethod
    def of(cls, cfg: Config, item: Mapping[str, Any]) -> "Refs":
        """The concrete values of one stage instance."""
        return cls(item, cfg.data.train_split, cfg.data.test_split, cfg.data.root)

    @classmethod
    def templates(cls, fan_out: tuple[str, ...]) -> "Refs":
        """DVC template strings (``${item.split}``, ``${data.train_split}``) in place of values."""
        return cls({dim: f"${{item.{dim}}}" for dim in fan_out}, "${data.train_split}", "${data.test_split}",
                   "${data.root}")


def _no_inputs(refs: Refs) -> dict[str, Path | str]:
    return {}


@dataclass(frozen=True)
class Stage:
    """One entry of the stage table.

    ``inputs`` and ``outputs`` map names to paths (from :mod:`stages.core.layout`);
    a name that is also a parameter of ``run`` receives that path. ``params``
    lists the ``params.yaml`` keys the outputs depend on: every key that
    :func:`arguments` binds must be covered by one of them (a test checks). A
    stage that reads only some keys of a section it receives whole lists those
    keys, so that the others never rerun it (``spp_features`` reads
    ``finetune.arch`` and ``finetune.weights`` only).
    """

    name: str
    help: str
    outputs: Callable[[Refs], Mapping[str, Output]]
    inputs: Callable[[Refs], Mapping[str, Path | str]] = _no_inputs
    fan_out: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    module: str = field(default="")
    recipes: str = FAN_OUT["recipe"]  # the config attribute listing this stage's ``recipe`` values
    needed_by: tuple[str, ...] = ()  # the recipes whose results this stage serves; () = every recipe
    constants: tuple[tuple[str, Any], ...] = ()  # (run() parameter, value) pairs fixed by this entry

    def needed(self, cfg: Config) -> bool:
        """Whether ``detect.recipes`` holds a recipe this stage serves: a stage no enabled recipe needs has no
        instance (neither ``dvc.yaml`` nor the Luigi tasks run it)."""
        return not self.needed_by or any(recipe in cfg.detect.recipes for recipe in self.needed_by)

    @property
    def derived_recipes(self) -> bool:
        """Whether the recipe values are computed from ``detect.recipes`` (a property), not a params key.

        DVC templates cannot filter a list, so ``dvc.yaml`` spells such values
        out when it is generated (:mod:`pipeline.dvc_yaml`).
        """
        return "recipe" in self.fan_out and self.recipes != FAN_OUT["recipe"]

    def __post_init__(self) -> None:
        unknown = set(self.fan_out) - set(FAN_OUT)
        if unknown:
            raise ValueError(f"stage {self.name}: unknown fan-out {sorted(unknown)}; known: {list(FAN_OUT)}")
        if not self.module:
            object.__setattr__(self, "module", self.name)

    def entry(self) -> Callable[..., None]:
        """``stages.<module>.run``, imported on demand (importing torch takes seconds)."""
        return importlib.import_module(f"stages.{self.module}").run


def address(stage: Stage, item: Mapping[str, Any]) -> str:
    """The instance's DVC name: ``proposals@trainval-0``, ``svm@rcnn``, ``recall``."""
    values = [str(item[dim]) for dim in stage.fan_out]
    return f"{stage.name}@{'-'.join(values)}" if values else stage.name


def fan_out_values(cfg: Config, stage: Stage, dim: str) -> tuple[Any, ...]:
    values = resolve(cfg, stage.recipes if dim == "recipe" else FAN_OUT[dim])
    return tuple(dict.fromkeys(values))


def items(stage: Stage, cfg: Config) -> list[dict[str, Any]]:
    """Every instance of a stage, as ``{dimension: value}``, in DVC's matrix order; none if no enabled recipe
    needs the stage (:meth:`Stage.needed`)."""
    if not stage.needed(cfg):
        return []
    axes = [fan_out_values(cfg, stage, dim) for dim in stage.fan_out]
    return [dict(zip(stage.fan_out, combo)) for combo in itertools.product(*axes)]


def instances(table: tuple[Stage, ...], cfg: Config) -> list[tuple[Stage, dict[str, Any]]]:
    return [(stage, item) for stage in table for item in items(stage, cfg)]


def resolve(cfg: Config, key: str) -> Any:
    """An attribute path of ``cfg``: a section (``svm``), a key (``data.train_split``) or a property."""
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _section_by_type() -> dict[type, str]:
    hints = typing.get_type_hints(Config)
    return {hint: f.name for f in dataclasses.fields(Config) for hint in [hints[f.name]]}


def bindings(stage: Stage) -> dict[str, tuple[str, tuple[str, ...]]]:
    """``run`` parameter -> (config attribute, params keys it reads); fan-out values and paths left out."""
    run = stage.entry()
    hints, sections = typing.get_type_hints(run), _section_by_type()
    probe = Refs({dim: "" for dim in stage.fan_out}, "", "", "")
    paths = {**stage.inputs(probe), **stage.outputs(probe)}
    keys = {}
    for name, param in inspect.signature(run).parameters.items():
        if name in stage.fan_out or name in paths or name in dict(stage.constants):
            continue
        if name in CONFIG_NAMES:
            keys[name] = CONFIG_NAMES[name]
        elif hints.get(name) in sections:
            keys[name] = (sections[hints[name]], (sections[hints[name]],))
        elif param.default is inspect.Parameter.empty:
            raise TypeError(f"stage {stage.name}: cannot bind {stage.module}.run() parameter {name!r}")
    return keys


def arguments(stage: Stage, cfg: Config, item: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of the stage's ``run`` for one instance."""
    refs = Refs.of(cfg, item)
    paths = {name: Path(p) for name, p in stage.inputs(refs).items()}
    paths.update({name: Path(out.path) for name, out in stage.outputs(refs).items()})
    names = inspect.signature(stage.entry()).parameters
    values = {name: item[name] for name in stage.fan_out if name in names}
    values.update({name: path for name, path in paths.items() if name in names})
    values.update({name: resolve(cfg, attribute) for name, (attribute, _) in bindings(stage).items()})
    values.update(stage.constants)
    return values


def call(stage: Stage, cfg: Config, item: Mapping[str, Any]) -> None:
    """Run one stage instance in this process, its CPU kernels pinned and numpy's BLAS on one thread
    (:mod:`stages.core.kernels`)."""
    pin_cpu_kernels()
    require_pinned_blas()
    require_pinned_mkl()
    with one_blas_thread():
        stage.entry()(**arguments(stage, cfg, item))
