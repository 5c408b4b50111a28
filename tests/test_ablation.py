"""The ablation runner (bench.ablation): its table rows (Fast R-CNN rows read their run records, have no SVM),
``--seeds`` (the seed offsets, mean ± sample standard deviation, the per-seed figures in the report)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench import ablation
from bench.ablation import (TEST_TASKS, TRAIN_TASKS, VARIANTS, VELOCITIES, Spread, markdown, row, seed_params,
                            seeded_sections, summarise, velocity_row)
from pipeline.project import write_params
from stages.core import layout, runs

REPO = Path(__file__).resolve().parents[1]


def test_a_fast_rcnn_row_takes_its_test_time_from_the_detection_run_record(tmp_path):
    reports = tmp_path / layout.REPORTS
    reports.mkdir(parents=True)
    (reports / "map_fast_rcnn_svd.json").write_text(json.dumps({"mAP_voc07": 0.5, "mAP_voc2010": 0.25}))
    (reports / "proposals.json").write_text(json.dumps({"test": {"images": 4}}))
    record = tmp_path / runs.run_file(layout.detections_file("fast_rcnn_svd"))
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"seconds_per_image": 0.125}))
    result = row("SVD", tmp_path, "fast_rcnn_svd", {"FastRcnnTrain:fast_rcnn": 30.0}, {"Finetune": 99.0}, "test")
    assert result == {"variant": "SVD", "mAP (VOC07 11-pt)": 50.0, "mAP (VOC2010+)": 25.0, "train s": 30.0,
                      "SVM stage s": None, "SVM fitting s": None, "test s/img": 0.125}
    assert markdown([result]).splitlines()[2] == "| SVD | 50.0 | 25.0 | 30.00 | - | - | 0.12 |"


def test_a_velocities_row_adds_the_proposals_and_their_seconds(tmp_path):
    reports = tmp_path / layout.REPORTS
    reports.mkdir(parents=True)
    (reports / "proposals.json").write_text(json.dumps({"test": {"images": 4, "boxes_per_image": 1999.6}}))
    record = tmp_path / runs.run_file(layout.detections_file("faster_rcnn"))
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"seconds_per_image": 0.5, "proposals_per_image": 300.0}))
    measured = {"variant": "V", "mAP (VOC07 11-pt)": 50.0, "mAP (VOC2010+)": 25.0, "train s": 30.0,
                "SVM stage s": None, "SVM fitting s": None, "test s/img": 0.25}
    slow = velocity_row(measured, tmp_path, "fast_rcnn", {"Proposals:test": 6.0}, {}, "test")
    assert list(slow) == ["variant", "mAP (VOC07 11-pt)", "mAP (VOC2010+)", "proposals", "train s", "SVM stage s",
                          "SVM fitting s", "test s/img", "test s/img with proposals"]
    assert (slow["proposals"], slow["test s/img with proposals"]) == ("selective search 2000", 0.25 + 6.0 / 4)
    faster = velocity_row({**measured, "test s/img": 0.5}, tmp_path, "faster_rcnn", {"Proposals:test": 6.0}, {},
                          "test")
    assert (faster["proposals"], faster["test s/img with proposals"]) == ("RPN 300", 0.5)  # in its own record
    assert [VARIANTS[name][0] for name in VELOCITIES] == ["rcnn", "sppnet", "fast_rcnn", "fast_rcnn_ohem",
                                                           "fast_rcnn_svd", "faster_rcnn", "faster_rcnn_joint"]


def test_every_variant_recipe_has_its_training_tasks():
    import pipeline

    assert {recipe for recipe, _ in VARIANTS.values()} <= set(TRAIN_TASKS)
    families = {task.split(":")[0] for tasks in (*TRAIN_TASKS.values(), *TEST_TASKS.values()) for task in tasks}
    assert families <= {task.__name__ for task in pipeline.TASKS.values()}  # the runner's keys name Luigi tasks


# --- --seeds: K runs per variant, mAP as mean ± sample standard deviation ---------------------------


def test_seed_offsets_change_the_training_seeds_never_the_data_seeds():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["finetune"]["seed"] = 5  # an offset adds to whatever seed the section has
    shifted = seed_params(params, 2)
    assert seeded_sections(params) == ["finetune", "sppnet", "fast_rcnn", "svm", "bbox"]
    assert {name: shifted[name]["seed"] for name in ("finetune", "sppnet", "fast_rcnn", "svm", "bbox")} == {
        "finetune": 7, "sppnet": 2, "fast_rcnn": 2, "svm": 2, "bbox": 2}
    assert shifted["synthetic"]["seed"] == 0 and shifted["proposals"]["seed"] == 0
    for name in ("finetune", "sppnet", "fast_rcnn", "svm", "bbox"):  # nothing but the seed moves
        assert {k: v for k, v in shifted[name].items() if k != "seed"} == \
            {k: v for k, v in params[name].items() if k != "seed"}
    assert {k: v for k, v in shifted.items() if k not in seeded_sections(params)} == \
        {k: v for k, v in params.items() if k not in seeded_sections(params)}
    assert params["finetune"]["seed"] == 5 and params["svm"]["seed"] == 0  # the argument is left as it was
    assert seed_params(params, 0) == params  # seed 0 is the run without --seeds


def test_a_spread_is_the_mean_and_the_sample_standard_deviation():
    spread = Spread((90.0, 92.0, 94.0))
    assert spread.format(1) == "92.0 ± 2.0"  # ddof=1: sqrt(8 / 2); the population std would be 1.6
    assert spread.as_json() == {"mean": 92.0, "std": 2.0, "per_seed": [90.0, 92.0, 94.0]}
    assert Spread((1.0, 2.0)).format(2) == "1.50 ± 0.71"
    assert Spread((74.86,)).format(1) == "74.9" and Spread((74.86,)).std is None  # one seed: the value alone


def test_a_summary_row_keeps_the_columns_and_averages_the_times():
    seeds = [{"variant": "V", "mAP (VOC07 11-pt)": m, "mAP (VOC2010+)": m + 1.0, "train s": t, "SVM stage s": None,
              "SVM fitting s": None, "test s/img": 0.5} for m, t in ((90.0, 10.0), (92.0, 20.0), (94.0, 60.0))]
    summary = summarise(seeds)
    assert list(summary) == list(seeds[0])
    assert markdown([summary]).splitlines()[2] == "| V | 92.0 ± 2.0 | 93.0 ± 2.0 | 30.00 | - | - | 0.50 |"
    assert markdown([summarise(seeds[:1])]) == markdown(seeds[:1])  # one seed: today's table, cell for cell


def fake_pipeline(calls: list[dict]):
    """A stand-in for run_pipeline: writes the reports a run would, with mAP a function of the params.

    VOC07 mAP: 90 + 2 x finetune.seed, 5 less without box regression, 10 more for Fast R-CNN recipes;
    VOC2010+: VOC07 + 1. Every run takes 10 + finetune.seed s of fine-tuning; only seed 0's full run
    caches the training features (100 s): the other seeds' rows take that from it. Checks that every
    variant folder is a copy of the full run of its own seed. Files are replaced, never rewritten in
    place, as the stages do (the copies are hard links).
    """
    def put(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        path.write_text(text)

    def run(folder: Path) -> dict[str, float]:
        params = yaml.safe_load((folder / "params.yaml").read_text())
        seed = params["finetune"]["seed"]
        calls.append({"folder": folder.name, "home": folder.parent.name, "finetune": seed,
                      "fast_rcnn": params["fast_rcnn"]["seed"], "synthetic": params["synthetic"]["seed"],
                      "proposals": params["proposals"]["seed"]})
        reports = folder / layout.REPORTS
        marker = folder / layout.CACHE / "full-run-seed.txt"  # hard-linked into the variant copies
        if folder.name == "base":
            put(marker, str(seed))
        else:
            assert marker.read_text() == str(seed)
        put(reports / "proposals.json", json.dumps({"test": {"images": 4, "boxes_per_image": 500.0}}))
        for recipe in params["detect"]["recipes"]:
            voc07 = 0.90 + 0.02 * seed - (0.05 if not params["detect"]["box_regression"] else 0.0)
            voc07 += 0.10 * recipe.startswith("fast_rcnn")
            put(reports / f"map_{recipe}.json", json.dumps({
                "mAP_voc07": voc07, "mAP_voc2010": voc07 + 0.01, "AP_voc07": {"box": voc07},
                "AP_voc2010": {"box": voc07 + 0.01}, "num_positives": {"box": 3}}))
            record_of = layout.svm_model(recipe) if recipe in TEST_TASKS else layout.detections_file(recipe)
            put(folder / runs.run_file(record_of),
                json.dumps({"seconds_per_image": 0.25, "proposals_per_image": 300.0,
                            "classes": {"box": {"seconds": 1.0}}}))
        first_full_run = folder.name == "base" and seed == 0
        return {"Finetune": 10.0 + seed, **({"Features:train": 100.0} if first_full_run else {})}
    return run


def tiny_project(folder: Path, params: dict) -> Path:
    folder.mkdir(parents=True)
    write_params(folder, params)
    return folder


@pytest.fixture
def fake_runs(monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(ablation, "run_pipeline", fake_pipeline(calls))
    monkeypatch.setattr(ablation, "scratch_project", tiny_project)
    return calls


def test_seeds_reach_the_report_as_mean_and_spread_with_every_seed(tmp_path, fake_runs):
    out = tmp_path / "report" / "ablation.md"
    report = ablation.main(["--seeds", "3", "--skip", "Fast R-CNN,", "--skip", "SVD", "--skip", "OHEM",
                            "--skip", "hard-negative", "--skip", "softmax", "--skip", "float32", "--skip", "dropout",
                            "--skip", "Faster", "--report", str(out)])
    variants = ["R-CNN: fine-tuned, SVMs, box regression", "no box regression", "no fine-tuning (ImageNet features)",
                "SPP-net features", "Fast R-CNN (hierarchical sampling)", "Fast R-CNN fc7 + SVMs (post-hoc)"]
    # 3 full runs and 3 x 5 variant runs; training seeds 0, 1, 2, the data's always 0
    assert len(fake_runs) == 3 * (1 + len(variants))
    assert sorted({(c["home"] if c["home"].startswith("seed-") else "seed-0", c["finetune"], c["fast_rcnn"])
                   for c in fake_runs}) == [("seed-0", 0, 0), ("seed-1", 1, 1), ("seed-2", 2, 2)]
    assert {(c["synthetic"], c["proposals"]) for c in fake_runs} == {(0, 0)}
    lines = report.splitlines()
    assert "mean ± the sample standard deviation (ddof=1) over 3 seeds" in report
    assert "| R-CNN: fine-tuned, SVMs, box regression | 92.0 ± 2.0 | 93.0 ± 2.0 | 111.00 | 0.00 | 1.00 | 0.00 |" in lines
    assert "| no box regression | 87.0 ± 2.0 | 88.0 ± 2.0 | 111.00 | 0.00 | 1.00 | 0.00 |" in lines
    assert "| Fast R-CNN (hierarchical sampling) | 102.0 ± 2.0 | 103.0 ± 2.0 | 0.00 | - | - | 0.25 |" in lines
    # post-hoc SVMs on Fast R-CNN's features: a feature recipe's row, its SVM fitting seconds from the SVM model
    assert "| Fast R-CNN fc7 + SVMs (post-hoc) | 102.0 ± 2.0 | 103.0 ± 2.0 | 0.00 | 0.00 | 1.00 | 0.00 |" in lines
    assert "| variant | seed +0 | seed +1 | seed +2 |" in lines
    assert "| no box regression | 85.0 / 86.0 | 87.0 / 88.0 | 89.0 / 90.0 |" in lines
    assert "Per-class AP of the full run of seed +0:" in report
    assert out.read_text() == report
    figures = json.loads(out.with_suffix(".json").read_text())
    assert figures["seeds"] == 3 and figures["seeded_sections"] == ["finetune", "sppnet", "fast_rcnn", "svm", "bbox"]
    no_regression = next(v for v in figures["variants"] if v["variant"] == "no box regression")
    assert no_regression["mAP (VOC07 11-pt)"]["per_seed"] == pytest.approx([85.0, 87.0, 89.0])
    assert no_regression["mAP (VOC07 11-pt)"]["std"] == pytest.approx(2.0)
    assert [r["train s"] for r in no_regression["per_seed"]] == [110.0, 111.0, 112.0]


def test_one_seed_gives_the_table_without_spread(tmp_path, fake_runs):
    out = tmp_path / "ablation.md"
    report = ablation.main(["--skip", "Fast R-CNN", "--skip", "SPP", "--skip", "Faster", "--report", str(out)])
    assert len(fake_runs) == 1 + 6 and {c["finetune"] for c in fake_runs} == {0}
    assert "| no box regression | 85.0 | 86.0 | 110.00 | 0.00 | 1.00 | 0.00 |" in report.splitlines()
    assert "±" not in report and "seed +" not in report
    assert "Per-class AP of the full run:" in report
    assert json.loads(out.with_suffix(".json").read_text())["variants"][1]["mAP (VOC07 11-pt)"] == {
        "mean": pytest.approx(85.0), "std": None, "per_seed": [pytest.approx(85.0)]}


def test_velocities_train_every_recipe_in_the_full_run_and_plot_seconds_against_map(tmp_path, fake_runs, monkeypatch):
    out = tmp_path / "velocities.md"
    trained_for = []

    def fake_peer(base, seconds):
        trained_for.append((base.name, seconds))
        return {"variant": ablation.PEER_ROW, "mAP (VOC07 11-pt)": 80.0, "mAP (VOC2010+)": 81.0, "proposals": "RPN",
                "train s": seconds, "SVM stage s": None, "SVM fitting s": None, "test s/img": 0.5,
                "test s/img with proposals": 0.5}

    monkeypatch.setattr(ablation, "peer_row", fake_peer)
    report = ablation.main(["--velocities", "--report", str(out)])
    assert trained_for == [("base", 0.0)]  # as long as the alternating training took (the fake: no time)
    assert f"| {ablation.PEER_ROW} | 80.0 | 81.0 | RPN | 0.00 | - | - | 0.50 | 0.50 |" in report.splitlines()
    assert len(fake_runs) == 1 + len(VELOCITIES)
    lines = report.splitlines()
    assert "| Faster R-CNN (approximate joint training) | 90.0 | 91.0 | RPN 300 | 0.00 | - | - | 0.25 | 0.25 |" in lines
    assert "| SPP-net features | 90.0 | 91.0 | selective search 500 | 0.00 | 0.00 | 1.00 | 0.00 | 0.00 |" in lines
    assert "no box regression" not in report
    assert out.with_suffix(".png").stat().st_size > 0 and out.with_suffix(".json").is_file()


def test_seeds_must_be_at_least_one(capsys):
    with pytest.raises(SystemExit):
        ablation.main(["--seeds", "0"])
    assert "expected a whole number >= 1" in capsys.readouterr().err
