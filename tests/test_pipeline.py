"""The stage table and what follows from it: the generated dvc.yaml, the Luigi tasks, shared completeness.

The fast tests check the expansions against each other (DVC's own reading of
the generated ``dvc.yaml`` against the table's concrete instances); the
end-to-end tests run the tiny DAG with ``dvc repro`` in one fresh project and
with Luigi in another, then hand each project to the other orchestrator.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO, artifacts, project_copy, run_to_end, sh, tiny_params, write_params

import pipeline
from pipeline import dvc_yaml
from stages.core import layout
from stages.core.config import load_config
from stages.core.provenance import code_files
from stages.core.stage import RUNTIME, Refs, address, bindings, instances
from stages.core.store import PerImageReader
from stages.table import TABLE

# end-to-end runs use one shard (sharding is exercised by test_scale_out)
SHARDS = (0,)
FEATURE_RECIPES, FAST_MODELS = ("rcnn", "sppnet", "fast_rcnn_svm"), ("fast_rcnn", "fast_rcnn_ohem")
FAST_RECIPES = (*FAST_MODELS, "fast_rcnn_svd", "fast_rcnn_ohem_svd")
FASTER_RECIPES = ("faster_rcnn", "faster_rcnn_joint")
RECIPES = (*FEATURE_RECIPES, *FAST_RECIPES, *FASTER_RECIPES)  # every recipe
# Faster R-CNN's alternating steps 4 to 6, all that a change of step 4's params reruns
STEPS_4_TO_6 = ["rpn_train_4", *(f"rpn_proposals_4@{s}-{k}" for s in ("trainval", "test") for k in SHARDS),
                "rpn_recall_4", "fast_rcnn_train_5", "faster_rcnn_detect@faster_rcnn", "evaluate@faster_rcnn"]


@pytest.fixture(scope="module")
def repo_config():
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        pipeline.config.cache_clear()
        yield pipeline.config()
    finally:
        os.chdir(cwd)
        pipeline.config.cache_clear()


def dvc_stages() -> dict[str, dict]:
    """DVC's own expansion of the committed dvc.yaml: address -> cmd, deps, params, outs."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        return {
            stage.addressing: {
                "cmd": stage.cmd,
                "deps": [str(Path(d.def_path)) for d in stage.deps if not hasattr(d, "params")],
                "params": {key for d in stage.deps if hasattr(d, "params") for key in d.params},
                "outs": {str(Path(o.def_path)) for o in stage.outs},
            }
            for stage in repo.index.stages
        }


def test_committed_dvc_yaml_is_the_generated_one():
    assert (REPO / "dvc.yaml").read_text() == dvc_yaml.generate(load_config(REPO / "params.yaml")), "stale dvc.yaml: run `make dvc.yaml`"


def test_dvc_expands_the_table_as_the_luigi_tasks_do(repo_config):
    stages = dvc_stages()
    table = {address(stage, item): (stage, item) for stage, item in instances(TABLE, repo_config)}
    assert sorted(stages) == sorted(table)
    requirements = {task.address for task in pipeline.RunAll().requires()}
    assert requirements == set(table)
    for name, (stage, item) in table.items():
        refs = Refs.of(repo_config, item)
        declared = stages[name]
        assert declared["cmd"] == " ".join(["python -m stages", stage.name,
                                            *(f"--{dim} {item[dim]}" for dim in stage.fan_out)])
        assert declared["outs"] == {str(o.path) for o in stage.outputs(refs).values()}, name
        inputs = [str(Path(p)) for p in dict.fromkeys(str(p) for p in stage.inputs(refs).values())]
        assert declared["deps"][:len(inputs)] == inputs, name
        assert declared["params"] == set(stage.params), name


def test_code_deps_are_the_import_closure_of_the_stage_and_the_binding():
    cfg = load_config(REPO / "params.yaml")
    every_recipe = dataclasses.replace(cfg, detect=dataclasses.replace(cfg.detect, recipes=RECIPES))
    stages = dvc_yaml.generate(every_recipe)  # every stage has an instance
    for stage in TABLE:
        files = {str(p.relative_to(REPO)) for p in code_files(stage.module) + code_files("core.stage")}
        assert f"stages/{stage.module}.py" in files and "stages/core/stage.py" in files
        assert set(dvc_yaml.stage_code_files(stage)) == files
        assert all(f"- {f}" in stages for f in files)
    assert "stages/svm.py" not in dvc_yaml.stage_code_files(TABLE[0])  # synthetic does not import svm


def test_every_bound_params_key_is_a_declared_dependency():
    """A section passed whole is covered by itself or by the keys of it the stage reads (declared one by one)."""
    for stage in TABLE:
        for name, (_, keys) in bindings(stage).items():
            for key in keys:
                covered = key == RUNTIME or any(key == p or p.startswith(f"{key}.") or key.startswith(f"{p}.")
                                                for p in stage.params)
                assert covered, f"{stage.name}: run({name}) reads {key}, not among its params {stage.params}"


def test_every_instance_has_its_producers_as_requirements(repo_config):
    """Luigi links stages by path as DVC does: each input is made by the instances Luigi requires."""
    tasks = {task.address: task for task in pipeline.RunAll().requires()}
    assert [t.address for t in tasks["synthetic"].requires()] == []
    assert sorted(t.address for t in tasks["recall"].requires()) == sorted(
        ["index", *(f"proposals@{s}-{k}" for s in repo_config.data.splits for k in repo_config.sharding.shards)])
    assert sorted(t.address for t in tasks["detect@rcnn"].requires()) == sorted(
        [*(f"features@test-{k}" for k in repo_config.sharding.shards), "svm@rcnn", "bbox@rcnn"])


def test_dvc_yaml_spells_out_the_recipes_and_a_stale_one_stops_every_stage_command(tmp_path):
    params = tiny_params()
    params["detect"]["recipes"] = ["rcnn", "fast_rcnn_svd"]
    folder = project_copy(tmp_path / "p", params)
    stages = yaml.safe_load((folder / "dvc.yaml").read_text())["stages"]
    assert stages["svm"]["matrix"]["recipe"] == ["rcnn"]  # feature recipes only
    assert stages["fast_rcnn_train"]["matrix"]["recipe"] == ["fast_rcnn"]  # the model the SVD recipe compresses
    assert stages["evaluate"]["matrix"]["recipe"] == "${detect.recipes}"
    assert "fast_rcnn_recache" not in stages  # only a feature recipe of a Fast R-CNN model needs it
    params["detect"]["recipes"] = ["fast_rcnn"]
    write_params(folder, params)
    assert "svm" not in yaml.safe_load((folder / "dvc.yaml").read_text())["stages"]  # no instance: left out
    stale = (folder / "dvc.yaml").read_text().replace("- fast_rcnn\n", "- fast_rcnn_ohem\n")
    (folder / "dvc.yaml").write_text(stale)
    with pytest.raises(dvc_yaml.StaleDvcYaml, match="make dvc.yaml"):
        dvc_yaml.check_recipes(load_config(folder / "params.yaml"), folder / "dvc.yaml")
    result = run_to_end(["python", "-m", "stages", "coco_gt"], folder)
    assert result.returncode == 1 and "run `make dvc.yaml`" in result.stderr


def test_a_stage_only_other_recipes_need_has_no_instance(tmp_path):
    params = tiny_params()
    params["detect"]["recipes"] = ["fast_rcnn"]
    folder = project_copy(tmp_path / "p", params)
    stages = yaml.safe_load((folder / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["synthetic", "index", "proposals", "recall", "fast_rcnn_train", "fast_rcnn_detect",
                            "coco_gt", "evaluate"]
    assert {plot for figure in yaml.safe_load((folder / "dvc.yaml").read_text())["plots"] for plot in figure} == {
        "proposal recall, ${data.train_split}", "proposal recall, ${data.test_split}"}  # no fine-tuning curves
    params["detect"]["recipes"] = ["sppnet"]
    cfg = load_config(write_params(folder, params))
    needed = {stage.name for stage, _ in instances(TABLE, cfg)}
    assert {"spp_features", "spp_finetune", "spp_recache"} <= needed
    assert not {"finetune", "features", "fast_rcnn_train"} & needed
    params["detect"]["recipes"] = ["faster_rcnn_joint"]  # its own proposals: no selective search
    cfg = load_config(write_params(folder, params))
    assert [stage.name for stage, _ in instances(TABLE, cfg)] == ["synthetic", "index", "faster_rcnn_joint",
                                                                  "faster_rcnn_detect", "coco_gt", "evaluate"]


def test_fast_rcnn_svm_runs_the_post_hoc_stages_on_the_trained_fast_rcnn_models_features(tmp_path, monkeypatch):
    from dvc.repo import Repo

    params = tiny_params()
    params["detect"]["recipes"] = ["fast_rcnn_svm"]
    folder = project_copy(tmp_path / "p", params)
    stages = yaml.safe_load((folder / "dvc.yaml").read_text())["stages"]
    assert stages["fast_rcnn_train"]["matrix"]["recipe"] == ["fast_rcnn"]
    assert stages["fast_rcnn_recache"]["matrix"]["recipe"] == ["fast_rcnn"]
    assert stages["svm"]["matrix"]["recipe"] == stages["detect"]["matrix"]["recipe"] == ["fast_rcnn_svm"]
    assert "fast_rcnn_detect" not in stages  # the softmax detections are recipe fast_rcnn's
    monkeypatch.chdir(folder)
    with Repo(str(folder)) as repo:
        outs = {s.addressing: [str(o.def_path) for o in s.outs] for s in repo.index.stages}
    assert outs["fast_rcnn_recache@fast_rcnn-test-1"] == ["features_cache/features/fast_rcnn_svm/test/shard-1.h5"]
    pipeline.config.cache_clear()
    pipeline._outputs_by_instance.cache_clear()
    try:  # Luigi's tasks of this project's params
        required = {task.address: sorted(t.address for t in task.requires()) for task in pipeline.RunAll().requires()}
    finally:
        pipeline.config.cache_clear()
        pipeline._outputs_by_instance.cache_clear()
    assert "fast_rcnn_train@fast_rcnn" in required["fast_rcnn_recache@fast_rcnn-trainval-0"]
    assert required["svm@fast_rcnn_svm"] == [f"fast_rcnn_recache@fast_rcnn-trainval-{k}" for k in (0, 1)]
    assert required["detect@fast_rcnn_svm"] == sorted(
        ["bbox@fast_rcnn_svm", "svm@fast_rcnn_svm", *(f"fast_rcnn_recache@fast_rcnn-test-{k}" for k in (0, 1))])
    assert "detect@fast_rcnn_svm" in required["evaluate@fast_rcnn_svm"]


def test_the_cli_has_one_command_per_stage():
    from stages.__main__ import _parser

    commands = _parser()._subparsers._group_actions[0].choices
    assert set(commands) == {stage.name for stage in TABLE} | {"inspect", "show", "predict"}
    args = _parser().parse_args(["proposals", "--split", "test", "--shard", "1"])
    assert (args.split, args.shard) == ("test", 1)


# --- end to end ---------------------------------------------------------------------------------


def e2e_params() -> dict:
    """The tiny parameters with one shard: the whole DAG twice stays within a few minutes."""
    params = tiny_params()
    params["sharding"]["shards"] = list(SHARDS)
    params["detect"]["recipes"] = list(RECIPES)
    return params


def dvc_repro(folder: Path) -> list[str]:
    """Run ``dvc repro``; return the stage instances it ran."""
    out = sh(folder, "dvc", "repro")
    return sorted(line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage"))


def luigi_run(folder: Path) -> list[str]:
    """Run the Luigi pipeline; return the stage instances whose stage it ran."""
    out = sh(folder, "luigi", "--module", "pipeline", "RunAll", "--local-scheduler", "--workers", "2")
    assert "This progress looks :)" in out, out
    return sorted(line.split("running ")[1].strip() for line in out.splitlines() if line.startswith("pipeline: running"))


def dvc_clean(folder: Path) -> bool:
    return "up to date" in sh(folder, "dvc", "status")


ALL = sorted(["synthetic", "index", "recall", "finetune", "spp_finetune", "coco_gt",
              *(f"{name}@{s}-{k}" for name in ("proposals", "features", "spp_features", "spp_recache")
                for s in ("trainval", "test") for k in SHARDS),
              *(f"{name}@{r}" for name in ("svm", "bbox", "detect") for r in FEATURE_RECIPES),
              *(f"{name}@{m}" for name in ("fast_rcnn_train", "fast_rcnn_detect") for m in FAST_MODELS),
              *(f"fast_rcnn_recache@fast_rcnn-{s}-{k}" for s in ("trainval", "test") for k in SHARDS),
              "rpn_train_1", "rpn_recall_2", "fast_rcnn_train_3", "faster_rcnn_joint",
              *(f"rpn_proposals_2@{s}-{k}" for s in ("trainval", "test") for k in SHARDS), *STEPS_4_TO_6[:-2],
              *(f"faster_rcnn_detect@{r}" for r in FASTER_RECIPES),
              *(f"evaluate@{r}" for r in RECIPES)])


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two fresh projects, the tiny DAG run by ``dvc repro`` in one and by Luigi in the other, at the same time."""
    root = tmp_path_factory.mktemp("orchestrators")
    dvc_dir, luigi_dir = project_copy(root / "dvc", e2e_params()), project_copy(root / "luigi", e2e_params())
    with ThreadPoolExecutor(2) as pool:
        dvc_ran, luigi_ran = pool.submit(dvc_repro, dvc_dir), pool.submit(luigi_run, luigi_dir)
        assert dvc_ran.result() == ALL
        assert luigi_ran.result() == ALL
    return dvc_dir, luigi_dir


def swap(projects: tuple[Path, Path]) -> tuple[list[str], list[str]]:
    """Luigi in the project DVC ran last, ``dvc repro`` in the one Luigi ran last: what each ran."""
    dvc_dir, luigi_dir = projects
    with ThreadPoolExecutor(2) as pool:
        luigi_ran, dvc_ran = pool.submit(luigi_run, dvc_dir), pool.submit(dvc_repro, luigi_dir)
        return luigi_ran.result(), dvc_ran.result()


@pytest.mark.slow
def test_both_orchestrators_write_identical_artifacts(projects):
    dvc_dir, luigi_dir = projects
    dvc_artifacts = artifacts(dvc_dir)
    # 2 index files, per split and shard proposals (selective search's and 2 RPNs'), R-CNN features, SPP
    # pyramids, SPP-net and Fast R-CNN features, per feature recipe an SVM and a box regressor, per recipe
    # detections (.h5 and .json), mAP and PR curve; 9 models and 9 curves (finetune, SPP-net, 2 Fast R-CNN,
    # the 4 alternating steps' and the joint one), 3 recall reports, the COCO ground truth
    assert len(dvc_artifacts) == 2 + 7 * 2 * len(SHARDS) + 3 * 2 + 9 * 4 + 9 * 2 + 3 + 1
    assert dvc_artifacts == artifacts(luigi_dir)
    for recipe in RECIPES:
        mean_ap = json.loads((dvc_dir / layout.map_metrics(recipe)).read_text())
        assert 0 <= mean_ap["mAP_voc07"] <= 1 and 0 <= mean_ap["mAP_voc2010"] <= 1
        assert (dvc_dir / layout.figures_dir(recipe) / "pr.png").is_file()
    assert "recall@0.5" in sh(dvc_dir, "dvc", "metrics", "show")
    assert "bbox_pred.weight" in sh(dvc_dir, "python", "-m", "stages", "inspect", "features_cache/fast_rcnn/fast_rcnn.pt")
    image = json.loads((dvc_dir / layout.coco_ground_truth("test")).read_text())["images"][0]["image_name"]
    for recipe in ("fast_rcnn_svd", "fast_rcnn_svm"):
        shown = sh(dvc_dir, "python", "-m", "stages", "show", "--image", image, "--recipe", recipe)
        assert (dvc_dir / shown.split("wrote ")[1].strip()).is_file()
    assert "recipe = fast_rcnn_svm" in sh(dvc_dir, "python", "-m", "stages", "inspect",
                                          "features_cache/features/fast_rcnn_svm/test/shard-0.h5")
    assert (dvc_dir / "features_cache" / "runs" / "proposals" / "test" / "shard-0.h5.json").is_file()


@pytest.mark.slow
def test_each_orchestrator_finds_the_others_work_complete(projects):
    assert swap(projects) == ([], [])
    assert all(dvc_clean(folder) for folder in projects)


def predicted(folder: Path, recipe: str, images: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """``python -m stages predict --recipe recipe`` on copies of the dataset's ``images`` (outside the
    dataset): each image's detections, as rows ``boxes``, ``scores``, ``labels``."""
    sh(folder, "python", "-m", "stages", "predict", "--recipe", recipe, "new", "--out", f"predicted/{recipe}")
    results = json.loads((folder / "predicted" / recipe / "detections.json").read_text())
    found = {}
    for position, name in enumerate(images):
        mine = [r for r in results if r["image_id"] == position + 1]
        assert all(r["image_name"] == f"new/{name}.jpg" for r in mine)
        found[name] = {"boxes": np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in mine)],
                                         np.float32).reshape(-1, 4),
                       "scores": np.array([r["score"] for r in mine], np.float32),
                       "labels": np.array([r["category_id"] - 1 for r in mine], np.int32)}
        assert (folder / "predicted" / recipe / f"{name}.png").is_file()
    return found


@pytest.mark.slow
def test_predict_on_new_images_gives_every_recipe_the_test_runs_detections(projects):
    dvc_dir = projects[0]
    images = (dvc_dir / "features_cache/synthetic/ImageSets/Main/test.txt").read_text().split()[:2]
    (dvc_dir / "new").mkdir()
    for name in images:
        shutil.copy(dvc_dir / "features_cache/synthetic/JPEGImages" / f"{name}.jpg", dvc_dir / "new")
    for recipe in RECIPES:
        with PerImageReader([dvc_dir / layout.detections_file(recipe)]) as stage:
            expected = {name: {row: stage.rows(row, stage.position(name)) for row in ("boxes", "scores", "labels")}
                        for name in images}
        for name, found in predicted(dvc_dir, recipe, images).items():
            assert len(found["scores"]) == len(expected[name]["scores"]) > 0, (recipe, name)
            np.testing.assert_array_equal(found["labels"], expected[name]["labels"])
            np.testing.assert_allclose(found["scores"], expected[name]["scores"], atol=1e-5)
            np.testing.assert_allclose(found["boxes"], expected[name]["boxes"], atol=0.01)  # JSON: 2 decimals


@pytest.mark.slow
def test_predict_with_a_stale_model_names_the_stage_to_rerun(projects):
    dvc_dir = projects[0]
    params = e2e_params()
    params["bbox"]["ridge_lambda"] = 100.0
    write_params(dvc_dir, params)
    try:
        result = run_to_end(["python", "-m", "stages", "predict", "--recipe", "rcnn", "new"], dvc_dir)
    finally:
        write_params(dvc_dir, e2e_params())
    assert result.returncode == 1
    assert "(stale stage instances: bbox@rcnn)" in result.stderr
    assert dvc_clean(dvc_dir)


@pytest.mark.slow
def test_a_parameter_change_reruns_exactly_its_dependents_under_either(projects):
    params = e2e_params()
    params["bbox"]["ridge_lambda"] = 100.0
    for folder in projects:
        write_params(folder, params)
    expected = sorted(f"{name}@{r}" for name in ("bbox", "detect", "evaluate") for r in FEATURE_RECIPES)
    assert swap(projects) == (expected, expected)
    params["fast_rcnn"]["svd_ranks"] = [12, 6]  # test time only: no model trained again, no full head's score
    for folder in projects:
        write_params(folder, params)
    expected = sorted([*(f"fast_rcnn_detect@{m}" for m in FAST_MODELS), *(f"evaluate@{m}_svd" for m in FAST_MODELS)])
    assert swap(projects) == (expected, expected)
    params["faster_rcnn"]["step4"]["learning_rate"] = 0.001  # Faster R-CNN's step 4: it and what follows
    for folder in projects:
        write_params(folder, params)
    assert swap(projects) == (sorted(STEPS_4_TO_6), sorted(STEPS_4_TO_6))
    assert swap(projects) == ([], [])
    assert artifacts(projects[0]) == artifacts(projects[1])
    params["runtime"]["num_workers"] = 1  # how to run, not what: nothing reruns
    for folder in projects:
        write_params(folder, params)
    assert swap(projects) == ([], [])


@pytest.mark.slow
def test_a_code_change_reruns_exactly_the_stages_that_import_it(projects):
    for folder in projects:
        with open(folder / "stages" / "evaluate.py", "a") as f:
            f.write("\n# a change\n")
    expected = sorted(f"evaluate@{r}" for r in RECIPES)
    assert swap(projects) == (expected, expected)
    assert swap(projects) == ([], [])


@pytest.mark.slow
def test_an_artifact_edited_by_hand_is_not_complete(projects):
    dvc_dir, luigi_dir = projects
    for folder in projects:
        detections = folder / layout.coco_detections("rcnn")
        detections.write_text(detections.read_text()[:-20])  # truncated
    luigi_ran, dvc_ran = swap(projects)
    assert luigi_ran == ["detect@rcnn"]  # rewritten identically: evaluate@rcnn is still current
    assert dvc_ran in ([], ["detect@rcnn"])  # DVC may restore the output from its run cache instead
    assert artifacts(dvc_dir) == artifacts(luigi_dir)
    assert all(dvc_clean(folder) for folder in projects)
