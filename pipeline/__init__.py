"""The pipeline as Luigi tasks: ``luigi --module pipeline RunAll --local-scheduler``.

Each task only wires parameters, requirements and targets, then runs its
``command()`` through :func:`stages.__main__.execute`: the very command line
that ``dvc.yaml`` gives ``python -m stages`` (a test checks they are equal), so
both orchestrators call the same ``stages.<module>.run`` with the same
arguments and write the same paths (:mod:`stages.core.layout`).

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

from stages.core import layout
from stages.core.atomic import write_text
from stages.core.config import Config, as_dict, load_config
from stages.core.provenance import code_version

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

    def command(self) -> list[str]:
        """The arguments of ``python -m stages`` that run this stage, as in ``dvc.yaml``."""
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
        from stages.__main__ import execute

        execute(config(), self.command())
        write_text(self.stamp, self.signature())


class Synthetic(StageTask):
    module = "synth"

    def params(self) -> dict[str, Any]:
        return {"synthetic": as_dict(config().synthetic)}

    def outputs(self) -> list[Path]:
        return [layout.SYNTHETIC]

    def command(self) -> list[str]:
        return ["synthetic"]


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

    def command(self) -> list[str]:
        return ["index"]


def keys(*names: str) -> dict[str, Any]:
    """``{name: value}`` of params sections (``"svm"``) or single keys (``"data.train_split"``)."""
    cfg, found = config(), {}
    for name in names:
        section, _, key = name.partition(".")
        value = getattr(cfg, section)
        found[name] = getattr(value, key) if key else as_dict(value)
    return json.loads(json.dumps(found, sort_keys=True))


class ShardTask(StageTask):
    """A stage run once per shard of one split."""

    split = luigi.Parameter()
    shard = luigi.IntParameter()

    def command(self) -> list[str]:
        return [self.module, "--split", self.split, "--shard", str(self.shard)]

    def shard_file(self) -> Path:
        raise NotImplementedError

    def outputs(self) -> list[Path]:
        return [self.shard_file(), layout.timing_file(self.shard_file())]


class Proposals(ShardTask):
    module = "proposals"

    def requires(self) -> list[luigi.Task]:
        return [Index()]

    def params(self) -> dict[str, Any]:
        return keys("proposals", "sharding", "data.on_error")

    def shard_file(self) -> Path:
        return layout.proposals_shard(self.split, self.shard)


def shards(task: type[ShardTask], split: str) -> list[luigi.Task]:
    return [task(split=split, shard=k) for k in config().sharding.shards]


class Recall(StageTask):
    module = "recall"

    def requires(self) -> list[luigi.Task]:
        return [task for split in dict.fromkeys(config().data.splits) for task in shards(Proposals, split)]

    def params(self) -> dict[str, Any]:
        return keys("data.train_split", "data.test_split", "sharding")

    def outputs(self) -> list[Path]:
        return [layout.PROPOSAL_METRICS] + [layout.recall_curve(s) for s in config().data.splits]

    def command(self) -> list[str]:
        return ["recall"]


class Finetune(StageTask):
    module = "finetune"

    def requires(self) -> list[luigi.Task]:
        return [Index()] + shards(Proposals, config().data.train_split)

    def params(self) -> dict[str, Any]:
        return keys("finetune", "data.train_split", "sharding")

    def outputs(self) -> list[Path]:
        return [layout.FINETUNED_MODEL, layout.FINETUNE_CURVE]

    def command(self) -> list[str]:
        return ["finetune"]


class Features(ShardTask):
    """R-CNN features (step 3) of one shard."""

    module = "features"

    def requires(self) -> list[luigi.Task]:
        return [Index(), Proposals(split=self.split, shard=self.shard), Finetune()]

    def params(self) -> dict[str, Any]:
        return keys("features", "finetune", "data.train_split", "sharding")

    def shard_file(self) -> Path:
        return layout.features_shard("rcnn", self.split, self.shard)


class SppFeatures(ShardTask):
    """SPP-net pyramids of the pre-trained conv layers, one shard."""

    module = "spp_features"

    def requires(self) -> list[luigi.Task]:
        return [Index(), Proposals(split=self.split, shard=self.shard)]

    def params(self) -> dict[str, Any]:
        return keys("sppnet", "features.precision", "features.compression", "finetune.arch", "finetune.weights",
                    "data.train_split", "sharding")

    def shard_file(self) -> Path:
        return layout.spp_shard(self.split, self.shard)


class SppFinetune(StageTask):
    module = "spp_finetune"

    def requires(self) -> list[luigi.Task]:
        return shards(SppFeatures, config().data.train_split)

    def params(self) -> dict[str, Any]:
        return keys("sppnet", "data.train_split", "sharding")

    def outputs(self) -> list[Path]:
        return [layout.SPP_HEAD, layout.SPP_FINETUNE_CURVE]

    def command(self) -> list[str]:
        return ["spp_finetune"]


class SppRecache(ShardTask):
    """The sppnet recipe's feature cache of one shard: fine-tuned fc features next to the pyramids."""

    module = "spp_recache"

    def requires(self) -> list[luigi.Task]:
        return [SppFeatures(split=self.split, shard=self.shard), SppFinetune()]

    def params(self) -> dict[str, Any]:
        return keys("features.precision", "features.compression", "sharding")

    def shard_file(self) -> Path:
        return layout.features_shard("sppnet", self.split, self.shard)


FEATURE_TASKS: dict[str, type[ShardTask]] = {"rcnn": Features, "sppnet": SppRecache}


class RecipeTask(StageTask):
    """A post-hoc stage run once per feature branch (``detect.recipes``)."""

    recipe = luigi.ChoiceParameter(choices=list(FEATURE_TASKS))

    def command(self) -> list[str]:
        return [self.module, "--recipe", self.recipe]

    def feature_shards(self, split: str) -> list[luigi.Task]:
        return shards(FEATURE_TASKS[self.recipe], split)


class Svm(RecipeTask):
    module = "svm"

    def requires(self) -> list[luigi.Task]:
        return self.feature_shards(config().data.train_split)

    def params(self) -> dict[str, Any]:
        return keys("svm", "data.train_split", "sharding")

    def outputs(self) -> list[Path]:
        return [layout.svm_model(self.recipe), layout.svm_report(self.recipe)]


class Bbox(RecipeTask):
    module = "bbox"

    def requires(self) -> list[luigi.Task]:
        return self.feature_shards(config().data.train_split)

    def params(self) -> dict[str, Any]:
        return keys("bbox", "data.train_split", "sharding")

    def outputs(self) -> list[Path]:
        return [layout.bbox_model(self.recipe)]


class Detect(RecipeTask):
    module = "detect"

    def requires(self) -> list[luigi.Task]:
        return self.feature_shards(config().data.test_split) + [Svm(recipe=self.recipe), Bbox(recipe=self.recipe)]

    def params(self) -> dict[str, Any]:
        return keys("detect.scorer", "detect.box_regression", "detect.nms_iou", "detect.max_per_class",
                    "detect.score_threshold", "data.test_split", "sharding")

    def outputs(self) -> list[Path]:
        out = layout.detections_file(self.recipe)
        return [out, layout.timing_file(out), layout.coco_detections(self.recipe)]


class Evaluate(RecipeTask):
    module = "evaluate"

    def requires(self) -> list[luigi.Task]:
        return [Index(), Detect(recipe=self.recipe)]

    def params(self) -> dict[str, Any]:
        return keys("evaluate", "data.test_split")

    def outputs(self) -> list[Path]:
        return [layout.map_metrics(self.recipe), layout.pr_curve(self.recipe), layout.figures_dir(self.recipe)]


class RunAll(luigi.WrapperTask):
    """Every stage of the pipeline: the proposal recall report and the evaluation of each recipe."""

    def requires(self) -> list[luigi.Task]:
        return [Recall()] + [Evaluate(recipe=r) for r in config().detect.recipes]


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
