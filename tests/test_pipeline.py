"""The two orchestrators: dvc.yaml and the Luigi tasks declare the same stages, and produce the same artifacts."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import pipeline
from stages.core import layout
from stages.core.provenance import code_files

from conftest import REPO, tiny_params, write_params

BIN = Path(sys.executable).parent
# end-to-end runs use one shard (sharding is exercised by test_scale_out)
SPLITS, SHARDS, RECIPES = ("trainval", "test"), (0,), ("rcnn", "sppnet")


def per_shard(name: str) -> list[str]:
    return [f"{name}@{s}-{k}" for s in SPLITS for k in SHARDS]


def per_recipe(*names: str) -> list[str]:
    return [f"{name}@{r}" for name in names for r in RECIPES]


PROPOSAL_STAGES = per_shard("proposals")
FEATURE_STAGES = [*per_shard("features"), *per_shard("spp_features"), "spp_finetune", *per_shard("spp_recache")]
POSTHOC_STAGES = per_recipe("svm", "bbox", "detect", "evaluate")


def dvc_stages() -> dict:
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        return {
            stage.addressing: {
                "cmd": stage.cmd,
                "deps": {str(Path(d.def_path)) for d in stage.deps if not hasattr(d, "params")},
                "params": {key for d in stage.deps if hasattr(d, "params") for key in d.params},
                "outs": {str(Path(o.def_path)) for o in stage.outs},
            }
            for stage in repo.index.stages
        }


def luigi_tasks() -> list[pipeline.StageTask]:
    todo, seen = [pipeline.RunAll()], []
    while todo:
        task = todo.pop()
        if isinstance(task, pipeline.StageTask) and task not in seen:
            seen.append(task)
        todo += pipeline.luigi.task.flatten(task.requires())
    return seen


def dvc_name(task: pipeline.StageTask) -> str:
    """DVC names each stage after its command; matrix stages add their split and shard, or recipe."""
    name = task.command()[0]
    if isinstance(task, pipeline.ShardTask):
        return f"{name}@{task.split}-{task.shard}"
    return f"{name}@{task.recipe}" if isinstance(task, pipeline.RecipeTask) else name


@pytest.fixture(scope="module")
def declared() -> tuple[dict, list]:
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        pipeline.config.cache_clear()
        return dvc_stages(), luigi_tasks()
    finally:
        os.chdir(cwd)
        pipeline.config.cache_clear()


def test_dvc_and_luigi_have_the_same_stages(declared):
    stages, tasks = declared
    assert sorted(stages) == sorted(dvc_name(t) for t in tasks)


def test_dvc_code_deps_are_exactly_the_stage_imports(declared):
    stages, tasks = declared
    for task in tasks:
        stage = stages[dvc_name(task)]
        expected = {str(p.relative_to(REPO)) for p in code_files(task.module)}
        assert {d for d in stage["deps"] if d.startswith("stages/")} == expected, dvc_name(task)


def test_dvc_runs_the_luigi_command_with_the_same_params_and_outs(declared):
    stages, tasks = declared
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        for task in tasks:
            stage = stages[dvc_name(task)]
            assert stage["cmd"] == " ".join(["python -m stages", *task.command()]), dvc_name(task)
            assert stage["params"] == set(task.params()), dvc_name(task)
            assert stage["outs"] == {str(p) for p in task.outputs()}, dvc_name(task)
    finally:
        os.chdir(cwd)


# --- end to end ---------------------------------------------------------------------------------


def project_copy(folder: Path, params: dict) -> Path:
    folder.mkdir()
    for name in ("stages", "pipeline"):
        shutil.copytree(REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "luigi.cfg"):
        shutil.copy(REPO / name, folder)
    write_params(folder, params)
    return folder


def sh(folder: Path, *command: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(folder)}
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def dvc_repro(folder: Path) -> list[str]:
    """Run ``dvc repro``; return the names of the stages it ran."""
    out = sh(folder, "dvc", "repro")
    return [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]


def luigi_run(folder: Path) -> list[str]:
    """Run the Luigi pipeline; return the task families that ran."""
    out = sh(folder, "luigi", "--module", "pipeline", "RunAll", "--local-scheduler", "--workers", "2")
    assert "This progress looks :)" in out, out
    ran = out.split("ran successfully:")[1].split("\n* ")[0] if "ran successfully:" in out else ""
    families = {line.strip().split("(")[0].lstrip("- 0123456789").strip() for line in ran.splitlines() if "(" in line}
    return sorted(families - {"RunAll"})


def both(dvc_dir: Path, luigi_dir: Path) -> tuple[list[str], list[str]]:
    """``dvc repro`` in one folder and the Luigi pipeline in the other, at the same time (the runs are
    independent, and a tiny stage is mostly its process's start-up on one core): what each ran."""
    with ThreadPoolExecutor(2) as pool:
        dvc, luigi = pool.submit(dvc_repro, dvc_dir), pool.submit(luigi_run, luigi_dir)
        return dvc.result(), luigi.result()


def artifacts(folder: Path) -> dict[str, bytes]:
    """Every HDF5 artifact, the model, curve, detection and mAP files that exist (runs of part of the DAG
    have only some), and the recall metrics without timings."""
    found = {str(p.relative_to(folder)): p.read_bytes() for p in sorted((folder / layout.CACHE).rglob("*.h5"))}
    outputs = [layout.FINETUNED_MODEL, layout.FINETUNE_CURVE, layout.SPP_HEAD, layout.SPP_FINETUNE_CURVE]
    for recipe in RECIPES:
        outputs += [layout.coco_detections(recipe), layout.map_metrics(recipe), layout.pr_curve(recipe)]
    for path in outputs:
        if (folder / path).is_file():
            found[str(path)] = (folder / path).read_bytes()
    metrics = json.loads((folder / layout.PROPOSAL_METRICS).read_text())
    for split in metrics.values():
        split.pop("seconds_per_image")
    found["metrics"] = json.dumps(metrics, sort_keys=True).encode()
    return found


def e2e_params() -> dict:
    """The tiny parameters with one shard: the whole DAG twice stays within a few minutes."""
    params = tiny_params()
    params["sharding"]["shards"] = list(SHARDS)
    return params


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny pipeline run once by ``dvc repro`` in a git repository and once by Luigi."""
    root = tmp_path_factory.mktemp("orchestrators")
    dvc_dir, luigi_dir = project_copy(root / "dvc", e2e_params()), project_copy(root / "luigi", e2e_params())
    sh(dvc_dir, "git", "init", "-q")
    sh(dvc_dir, "dvc", "init", "-q")
    expected = ["synthetic", "index", "recall", "finetune", *PROPOSAL_STAGES, *FEATURE_STAGES, *POSTHOC_STAGES]
    dvc_ran, luigi_ran = both(dvc_dir, luigi_dir)
    assert sorted(dvc_ran) == sorted(expected)
    assert luigi_ran == ["Bbox", "Detect", "Evaluate", "Features", "Finetune", "Index", "Proposals",
                                    "Recall", "SppFeatures", "SppFinetune", "SppRecache", "Svm", "Synthetic"]
    return dvc_dir, luigi_dir


def test_both_orchestrators_write_identical_artifacts(runs):
    dvc_dir, luigi_dir = runs
    dvc_artifacts, luigi_artifacts = artifacts(dvc_dir), artifacts(luigi_dir)
    # 2 index files, per split and shard proposals, R-CNN features, SPP pyramids and SPP-net features,
    # per recipe an SVM, a box regressor, detections (.h5 and .json), mAP and PR curve; 2 models, 2 curves, recall
    assert len(dvc_artifacts) == 2 + 4 * 2 * len(SHARDS) + 2 * 6 + 4 + 1
    assert dvc_artifacts == luigi_artifacts
    for recipe in RECIPES:
        mean_ap = json.loads((dvc_dir / layout.map_metrics(recipe)).read_text())
        assert 0 <= mean_ap["mAP_voc07"] <= 1 and 0 <= mean_ap["mAP_voc2010"] <= 1
        assert (dvc_dir / layout.figures_dir(recipe) / "pr.png").is_file()
    metrics = json.loads((dvc_dir / layout.PROPOSAL_METRICS).read_text())
    assert set(metrics) == {"trainval", "test"} and metrics["trainval"]["images"] == 6
    assert 0 < metrics["test"]["recall@0.7"] <= metrics["test"]["recall@0.5"] <= 1
    assert "recall@0.5" in sh(dvc_dir, "dvc", "metrics", "show")


def test_unchanged_rerun_does_nothing(runs):
    assert both(*runs) == ([], [])


def test_a_parameter_change_reruns_exactly_its_dependents(runs):
    dvc_dir, luigi_dir = runs
    params = e2e_params()
    params["bbox"]["ridge_lambda"] = 100.0
    for folder in runs:
        write_params(folder, params)
    dvc_ran, luigi_ran = both(*runs)
    assert sorted(dvc_ran) == sorted(per_recipe("bbox", "detect", "evaluate"))
    assert luigi_ran == ["Bbox", "Detect", "Evaluate"]
    assert artifacts(dvc_dir) == artifacts(luigi_dir)
    params["runtime"]["num_workers"] = 1  # how to run, not what: nothing reruns
    for folder in runs:
        write_params(folder, params)
    assert both(*runs) == ([], [])
