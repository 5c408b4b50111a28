"""Ablations as in the R-CNN paper's table: ``make ablation`` (``python -m bench.ablation``).

The whole pipeline runs once with the project's ``params.yaml`` (both recipes)
in a scratch workspace, through Luigi. Each variant then gets a hard-linked copy
of that workspace (stage outputs are always replaced by rename, never edited
in place, so the links are safe) with one parameter changed, and Luigi reruns
exactly the stages that parameter reaches (its completeness signatures, see
``pipeline/``): the "no fine-tuning" variant recomputes features, SVMs, box
regressors and detections, "no box regression" only detection and evaluation.

Times come from Luigi's per-task processing time; a stage a variant did not
rerun keeps the time it took in the full run. "train s" adds up fine-tuning,
the training split's feature caching and the post-hoc training stages of the
variant's recipe; "test s/img" is the test split's feature caching plus
detection, per test image. Writes the markdown table to
``features_cache/reports/ablation.md`` of the repository and prints it.
``--data-root`` runs the same on another VOC dataset (e.g. BCCD).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.common import REPO

# variant: (recipe it is read from, params changes)
VARIANTS: dict[str, tuple[str, dict[str, dict]]] = {
    "R-CNN: fine-tuned, SVMs, box regression": ("rcnn", {}),
    "no box regression": ("rcnn", {"detect": {"box_regression": False}}),
    "softmax instead of SVMs": ("rcnn", {"detect": {"scorer": "softmax"}}),
    "no fine-tuning (ImageNet features)": ("rcnn", {"features": {"model": "imagenet"}}),
    "SVMs without hard-negative mining": ("rcnn", {"svm": {"mining": False}}),
    "float32 feature cache": ("rcnn", {"features": {"precision": "float32"}}),
    "SPP-net features": ("sppnet", {}),
}
TRAIN_TASKS = {
    "rcnn": ("Finetune", "Features:train", "Svm:rcnn", "Bbox:rcnn"),
    "sppnet": ("SppFeatures:train", "SppFinetune", "SppRecache:train", "Svm:sppnet", "Bbox:sppnet"),
}
TEST_TASKS = {"rcnn": ("Features:test", "Detect:rcnn"), "sppnet": ("SppFeatures:test", "SppRecache:test", "Detect:sppnet")}

# Runs in the variant's folder: builds RunAll and records each task's processing time.
RUNNER = """
import json, sys, luigi, pipeline
times = {}
@luigi.Task.event_handler(luigi.Event.PROCESSING_TIME)
def record(task, seconds):
    cfg = pipeline.config()
    key = task.get_task_family()
    if isinstance(task, pipeline.ShardTask):
        key += ":train" if task.split == cfg.data.train_split else ":test"
    elif isinstance(task, pipeline.RecipeTask):
        key += ":" + task.recipe
    times[key] = times.get(key, 0.0) + seconds
ok = luigi.build([pipeline.RunAll()], local_scheduler=True, workers=1, log_level="WARNING")
json.dump(times, open(sys.argv[1], "w"))
sys.exit(0 if ok else 1)
"""


def run_pipeline(folder: Path) -> dict[str, float]:
    times_file = folder / "task_seconds.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", RUNNER, str(times_file)], cwd=folder, env=env, check=True)
    return json.loads(times_file.read_text())


def write_params(folder: Path, params: dict) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def variant_params(base: dict, recipe: str, changes: dict[str, dict]) -> dict:
    params = json.loads(json.dumps(base))
    for section, values in changes.items():
        params[section].update(values)
    params["detect"]["recipes"] = [recipe]
    return params


def row(name: str, folder: Path, recipe: str, times: dict[str, float], base_times: dict[str, float],
        test_split: str) -> dict:
    reports = folder / "features_cache" / "reports"
    metrics = json.loads((reports / f"map_{recipe}.json").read_text())
    num_test = json.loads((reports / "proposals.json").read_text())[test_split]["images"]
    seconds = {**base_times, **times}
    train = sum(seconds.get(t, 0.0) for t in TRAIN_TASKS[recipe])
    test = sum(seconds.get(t, 0.0) for t in TEST_TASKS[recipe]) / max(num_test, 1)
    return {"variant": name, "mAP (VOC07 11-pt)": 100 * metrics["mAP_voc07"],
            "mAP (VOC2010+)": 100 * metrics["mAP_voc2010"], "train s": train, "test s/img": test}


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    for r in rows:
        cells = [f"{v:.1f}" if "mAP" in k else f"{v:.2f}" if isinstance(v, float) else str(v) for k, v in r.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="a VOC dataset instead of the generated default one")
    parser.add_argument("--keep", action="store_true", help="keep the scratch workspaces")
    args = parser.parse_args(argv)
    base_params = yaml.safe_load((REPO / "params.yaml").read_text())
    if args.data_root:
        base_params["data"].update(root=str(Path(args.data_root).resolve()), on_error="skip")
    scratch = Path(tempfile.mkdtemp(prefix="rcnn-ablation-"))
    try:
        base = scratch / "base"
        base.mkdir()
        shutil.copy(REPO / "luigi.cfg", base)
        write_params(base, base_params)
        print(f"full pipeline in {base} ...", flush=True)
        base_times = run_pipeline(base)
        rows = []
        for name, (recipe, changes) in VARIANTS.items():
            folder = scratch / f"variant-{len(rows)}"
            shutil.copytree(base, folder, copy_function=os.link)
            write_params(folder, variant_params(base_params, recipe, changes))
            print(f"variant {name!r} ...", flush=True)
            times = run_pipeline(folder)
            rows.append(row(name, folder, recipe, times, base_times, base_params["data"]["test_split"]))
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    table = markdown(rows)
    dataset = args.data_root or "the generated default dataset"
    report = f"Ablations on {dataset} (test split), measured by `python -m bench.ablation`:\n\n{table}"
    out = REPO / "features_cache" / "reports" / "ablation.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)
    return report


if __name__ == "__main__":
    main()
