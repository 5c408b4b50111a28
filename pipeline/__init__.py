"""The pipeline as Luigi tasks: ``luigi --module pipeline RunAll --local-scheduler``.

Each task only wires parameters, requirements and targets, then calls the same
``stages.<module>.run`` entry point that ``dvc.yaml`` calls through
``python -m stages``; the artifacts land at the same paths (:mod:`stages.layout`).

Staleness: Luigi on its own calls a task complete as soon as its output exists.
Here a task is complete only if its outputs exist *and* the stamp it wrote
after its last successful run holds the task's current signature: a hash of
its params sections, its code files and the signatures of the tasks it
requires (or, for an external dataset, the names, sizes and modification times
of its files). Changing a parameter or a code file therefore reruns exactly
the tasks that depend on it, as ``dvc repro`` does.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import luigi

from stages import layout
from stages.atomic import write_text
from stages.config import Config, as_dict, load_config
from stages.provenance import code_version

STAMPS = layout.CACHE / ".luigi"


@functools.lru_cache(maxsize=1)
def config() -> Config:
    """``params.yaml`` of the working directory, read once per process."""
    return load_config()


class StageTask(luigi.Task):
    """A pipeline stage whose completeness also depends on its inputs' signature."""

    module: str  # stages.<module> holding the stage's run()

    def params(self) -> dict[str, Any]:
        """The params sections (or single keys) the stage's output depends on."""
        raise NotImplementedError

    def external_inputs(self) -> str:
        """Fingerprint of inputs that no task produces; empty when there are none."""
        return ""

    def outputs(self) -> list[Path]:
        raise NotImplementedError

    def execute(self) -> None:
        raise NotImplementedError

    def output(self) -> list[luigi.LocalTarget]:
        return [luigi.LocalTarget(str(p)) for p in self.outputs()]

    @functools.cached_property
    def _signature(self) -> str:
        requires = luigi.task.flatten(self.requires())
        content = {
            "code": code_version(self.module),
            "params": self.params(),
            "requires": sorted(t.signature() for t in requires),
            "external": self.external_inputs(),
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def signature(self) -> str:
        """Cached per task instance: Luigi builds each task once per run."""
        return self._signature

    @property
    def stamp(self) -> Path:
        return STAMPS / f"{self.task_id}.sig"

    def complete(self) -> bool:
        if not all(p.exists() for p in self.outputs()) or not self.stamp.is_file():
            return False
        return self.stamp.read_text() == self.signature()

    def run(self) -> None:
        self.execute()
        write_text(self.stamp, self.signature())


class Synthetic(StageTask):
    module = "synth"

    def params(self) -> dict[str, Any]:
        return {"synthetic": as_dict(config().synthetic)}

    def outputs(self) -> list[Path]:
        return [layout.SYNTHETIC]

    def execute(self) -> None:
        from stages import synth

        synth.run(config().synthetic, layout.SYNTHETIC)


class Index(StageTask):
    module = "index"

    def uses_synthetic(self) -> bool:
        return Path(config().data.root) == layout.SYNTHETIC

    def requires(self) -> list[luigi.Task]:
        return [Synthetic()] if self.uses_synthetic() else []

    def params(self) -> dict[str, Any]:
        return {"data": as_dict(config().data)}

    def external_inputs(self) -> str:
        return "" if self.uses_synthetic() else folder_fingerprint(Path(config().data.root))

    def outputs(self) -> list[Path]:
        return [layout.index_file(split) for split in config().data.splits]

    def execute(self) -> None:
        from stages import index

        index.run(config().data, layout.INDEX, config().runtime.num_workers)


class Proposals(StageTask):
    module = "proposals"
    split = luigi.Parameter()
    shard = luigi.IntParameter()

    def requires(self) -> list[luigi.Task]:
        return [Index()]

    def params(self) -> dict[str, Any]:
        cfg = config()
        return {"proposals": as_dict(cfg.proposals), "sharding": as_dict(cfg.sharding), "data.on_error": cfg.data.on_error}

    def outputs(self) -> list[Path]:
        shard_file = layout.proposals_shard(self.split, self.shard)
        return [shard_file, layout.timing_file(shard_file)]

    def execute(self) -> None:
        from stages import proposals

        cfg = config()
        proposals.run(
            cfg.proposals,
            cfg.data.on_error,
            self.split,
            self.shard,
            cfg.sharding.num_shards,
            layout.proposals_shard(self.split, self.shard),
            cfg.runtime.num_workers,
        )


class Recall(StageTask):
    module = "recall"

    def requires(self) -> list[luigi.Task]:
        cfg = config()
        return [Proposals(split=s, shard=k) for s in dict.fromkeys(cfg.data.splits) for k in cfg.sharding.shards]

    def params(self) -> dict[str, Any]:
        cfg = config()
        return {"data.train_split": cfg.data.train_split, "data.test_split": cfg.data.test_split,
                "sharding": as_dict(cfg.sharding)}

    def outputs(self) -> list[Path]:
        return [layout.PROPOSAL_METRICS] + [layout.recall_curve(s) for s in config().data.splits]

    def execute(self) -> None:
        from stages import recall

        recall.run(config().data.splits, config().sharding.num_shards, layout.PROPOSAL_METRICS)


class Finetune(StageTask):
    module = "finetune"

    def requires(self) -> list[luigi.Task]:
        cfg = config()
        return [Index()] + [Proposals(split=cfg.data.train_split, shard=k) for k in cfg.sharding.shards]

    def params(self) -> dict[str, Any]:
        cfg = config()
        return {"finetune": as_dict(cfg.finetune), "data.train_split": cfg.data.train_split,
                "sharding": as_dict(cfg.sharding)}

    def outputs(self) -> list[Path]:
        return [layout.FINETUNED_MODEL, layout.FINETUNE_CURVE]

    def execute(self) -> None:
        from stages import finetune

        cfg = config()
        finetune.run(cfg.finetune, cfg.data.train_split, cfg.sharding.num_shards, layout.FINETUNED_MODEL,
                     layout.FINETUNE_CURVE, cfg.runtime.num_workers)


class RunAll(luigi.WrapperTask):
    """Every stage of the pipeline."""

    def requires(self) -> list[luigi.Task]:
        return [Recall(), Finetune()]


def folder_fingerprint(root: Path) -> str:
    """Names, sizes and modification times of every file under ``root`` (cheap, like make)."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            info = path.stat()
            digest.update(f"{path.relative_to(root)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()
