"""Ablations as in the R-CNN paper's table: ``make ablation`` (``python -m bench.ablation``).

The whole pipeline runs once with the project's ``params.yaml`` (both recipes)
in a scratch workspace, through Luigi. Each variant then gets a hard-linked copy
of that workspace (stage outputs are always replaced by rename, never edited
in place, so the links are safe) with one parameter changed, and Luigi reruns
exactly the stages that parameter reaches (the record of completed work,
``dvc.lock``): the "no fine-tuning" variant recomputes features, SVMs, box
regressors and detections, "no box regression" only detection and evaluation.

Times come from Luigi's per-task processing time; a stage a variant did not
rerun keeps the time it took in the full run. "train s" adds up fine-tuning,
the training split's feature caching and the post-hoc training stages of the
variant's recipe (Fast R-CNN: its training stage; Fast R-CNN fc7 + SVMs, recipe
``fast_rcnn_svm``: that training, the caching of the training split's features
and its SVMs and box regressors); "SVM stage s" is the whole SVM stage (reading the cached
features image by image included), "SVM fitting s" the liblinear fits alone
(the sum over classes of the seconds in the SVM model's run record; "-" for
Fast R-CNN, which has none); "test s/img" is the test split's feature caching
plus detection, per test image (Fast R-CNN: conv pass plus head, from its
detection run record). Writes the
markdown table, and the per-class AP of the full run, to
``features_cache/reports/ablation.md`` of the repository
(``ablation-<dataset folder>.md`` with ``--data-root``) and prints it.
``--data-root`` runs the same on another VOC dataset (e.g. BCCD), ``--set
SECTION.KEY=VALUE`` changes a base parameter (e.g. ``proposals.max_boxes=500``
to bound the CPU time of a large dataset) and ``--skip TEXT`` leaves out the
variants whose name contains TEXT.

``--seeds K`` runs everything K times: run k (k = 0 .. K-1) adds k to the
``seed`` of every training section (finetune, sppnet, fast_rcnn, svm, bbox:
every section of params.yaml with a ``seed`` but the data's), so run 0 is the
run without ``--seeds``. The data stay fixed: ``synthetic.seed`` (the
generated dataset) and ``proposals.seed`` (it only orders OpenCV's selective
search output; the proposals are part of the data every recipe is trained and
tested on) are never changed, and the stages that read no seed are not rerun.
The full run of seed k is a hard-linked copy of seed 0's (Luigi reruns what
the seeds reach, from fine-tuning on), and each variant of seed k a copy of
it. Each mAP is then reported as mean +- sample standard deviation (ddof=1)
over the K runs (one run: the value alone), a second table lists the mAP of
every seed, and the time columns are means over the seeds. The same figures,
per seed, go to a JSON file beside the markdown report (``--report PATH``
writes both elsewhere: ``PATH`` and ``PATH`` with the suffix ``.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.common import REPO
from pipeline.project import scratch_project, write_params
from stages.core import layout, runs
from stages.core.atomic import atomic_path, write_text

# variant: (recipe it is read from, params changes)
VARIANTS: dict[str, tuple[str, dict[str, dict]]] = {
    "R-CNN: fine-tuned, SVMs, box regression": ("rcnn", {}),
    "no box regression": ("rcnn", {"detect": {"box_regression": False}}),
    "softmax instead of SVMs": ("rcnn", {"detect": {"scorer": "softmax"}}),
    "no fine-tuning (ImageNet features)": ("rcnn", {"features": {"model": "imagenet"}}),
    "SVMs without hard-negative mining": ("rcnn", {"svm": {"mining": False}}),
    "float32 feature cache": ("rcnn", {"features": {"precision": "float32"}}),
    "SPP-net features": ("sppnet", {}),
    "SPP-net, fc dropout 0.5 (the paper's)": ("sppnet", {"sppnet": {"dropout": 0.5}}),
    "Fast R-CNN (hierarchical sampling)": ("fast_rcnn", {}),
    "Fast R-CNN, only fc layers learn": ("fast_rcnn", {"fast_rcnn": {"learn_from": 1000}}),
    "Fast R-CNN, roi_pool and fc dropout 0.5 (the paper's)": (
        "fast_rcnn", {"fast_rcnn": {"pooling": "roi_pool", "dropout": 0.5}}),
    "Fast R-CNN + OHEM": ("fast_rcnn_ohem", {}),
    "Fast R-CNN + truncated SVD": ("fast_rcnn_svd", {}),
    "Fast R-CNN fc7 + SVMs (post-hoc)": ("fast_rcnn_svm", {}),
    "Faster R-CNN (4-step alternating training)": ("faster_rcnn", {}),
    "Faster R-CNN (approximate joint training)": ("faster_rcnn_joint", {}),
}
# the tutorial's "various velocities" table (--velocities): slow to faster, each at its defaults
VELOCITIES = ("R-CNN: fine-tuned, SVMs, box regression", "SPP-net features", "Fast R-CNN (hierarchical sampling)",
              "Fast R-CNN + OHEM", "Fast R-CNN + truncated SVD", "Faster R-CNN (4-step alternating training)",
              "Faster R-CNN (approximate joint training)")
TRAIN_TASKS = {
    "rcnn": ("Finetune", "Features:train", "Svm:rcnn", "Bbox:rcnn"),
    "sppnet": ("SppFeatures:train", "SppFinetune", "SppRecache:train", "Svm:sppnet", "Bbox:sppnet"),
    "fast_rcnn": ("FastRcnnTrain:fast_rcnn",),
    "fast_rcnn_ohem": ("FastRcnnTrain:fast_rcnn_ohem",),
    "fast_rcnn_svd": ("FastRcnnTrain:fast_rcnn",),
    "fast_rcnn_svm": ("FastRcnnTrain:fast_rcnn", "FastRcnnRecache:train", "Svm:fast_rcnn_svm", "Bbox:fast_rcnn_svm"),
    "faster_rcnn": ("RpnTrain1", "RpnProposals2:train", "FastRcnnTrain3", "RpnTrain4", "RpnProposals4:train",
                    "FastRcnnTrain5"),
    "faster_rcnn_joint": ("FasterRcnnJoint",),
}
FASTER_RCNN = ("faster_rcnn", "faster_rcnn_joint")  # recipes that propose their own regions
# The feature recipes' test seconds per image are their test feature caching and detect stage's; Fast R-CNN's
# are its detection run record's (conv pass plus the head timed alone)
TEST_TASKS = {"rcnn": ("Features:test", "Detect:rcnn"), "sppnet": ("SppFeatures:test", "SppRecache:test", "Detect:sppnet"),
              "fast_rcnn_svm": ("FastRcnnRecache:test", "Detect:fast_rcnn_svm")}

# Runs in the variant's folder: builds RunAll and records each task's processing time.
RUNNER = """
import json, sys, luigi, pipeline
times = {}
@luigi.Task.event_handler(luigi.Event.PROCESSING_TIME)
def record(task, seconds):
    if isinstance(task, pipeline.RunAll):  # a wrapper: its stages' times are recorded
        return
    key = pipeline.timing_key(task.stage, task.item, pipeline.config())
    times[key] = times.get(key, 0.0) + seconds
ok = luigi.build([pipeline.RunAll()], local_scheduler=True, workers=1, log_level="WARNING")
json.dump(times, open(sys.argv[1], "w"))
sys.exit(0 if ok else 1)
"""


TIMES = "task_seconds.json"  # per folder, never hard-linked: the seconds of every task run there so far


def run_pipeline(folder: Path) -> dict[str, float]:
    """Run RunAll in ``folder``; the processing seconds of every task run there, this time or before."""
    times_file, new_times = folder / TIMES, folder / f"new-{TIMES}"
    env = {**os.environ, "PYTHONPATH": str(folder)}
    subprocess.run([sys.executable, "-c", RUNNER, str(new_times)], cwd=folder, env=env, check=True)
    before = json.loads(times_file.read_text()) if times_file.exists() else {}
    times = {**before, **json.loads(new_times.read_text())}
    write_text(times_file, json.dumps(times, indent=2))
    new_times.unlink()
    return times


def variant_copy(base: Path, folder: Path) -> None:
    """A copy of the base workspace whose artifacts are hard links (stages and DVC replace, never edit, them);
    text files that DVC rewrites in place (dvc.lock) are copied, and DVC's state database is left out."""
    def link_artifacts(src: str, dst: str) -> None:
        big = Path(src).relative_to(base).parts[0] in ("features_cache",) or "cache" in Path(src).parts
        (os.link if big else shutil.copy2)(src, dst)

    shutil.copytree(base, folder, copy_function=link_artifacts, ignore=shutil.ignore_patterns(TIMES, "tmp"))


def apply_setting(params: dict, assignment: str) -> None:
    """Apply ``SECTION.KEY=VALUE`` (VALUE read as YAML) to the params dictionary; unknown keys are errors."""
    key, sep, value = assignment.partition("=")
    section, _, name = key.partition(".")
    if not sep or section not in params or name not in params[section]:
        raise SystemExit(f"--set {assignment!r}: expected SECTION.KEY=VALUE with a key of params.yaml")
    params[section][name] = yaml.safe_load(value)


# Sections whose seed describes the data, not the training: the same in every seed's run.
DATA_SEEDS = ("synthetic", "proposals")


def seeded_sections(params: dict) -> list[str]:
    """The sections whose ``seed`` ``--seeds`` varies: every section with a seed but :data:`DATA_SEEDS`."""
    return [name for name, section in params.items()
            if isinstance(section, dict) and "seed" in section and name not in DATA_SEEDS]


def seed_params(params: dict, offset: int) -> dict:
    """A copy of ``params`` with ``offset`` added to the seed of every :func:`seeded_sections` section."""
    params = json.loads(json.dumps(params))
    for name in seeded_sections(params):
        params[name]["seed"] += offset
    return params


@dataclass(frozen=True)
class Spread:
    """One figure measured once per seed: the mean and the sample standard deviation (ddof=1)."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        """Sample standard deviation (ddof=1); None for a single value."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def format(self, digits: int) -> str:
        """``mean ± std``; a single value alone, as a run without ``--seeds`` shows it."""
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

    def as_json(self) -> dict:
        return {"mean": self.mean, "std": self.std, "per_seed": list(self.values)}


MAP_COLUMNS = ("mAP (VOC07 11-pt)", "mAP (VOC2010+)")


def summarise(rows: list[dict]) -> dict:
    """One variant's row over its per-seed rows (seed 0 first): each mAP a :class:`Spread`, each time the mean
    over the seeds (None where the variant has none)."""
    summary = {}
    for key, first in rows[0].items():
        values = [r[key] for r in rows]
        if key in MAP_COLUMNS:
            summary[key] = Spread(tuple(values))
        elif isinstance(first, float):
            summary[key] = statistics.fmean(values)
        else:
            summary[key] = first
    return summary


def per_seed_table(per_seed: dict[str, list[dict]]) -> list[dict]:
    """The mAP of every seed, ``VOC07 / VOC2010+``, one row per variant and one column per seed offset."""
    return [{"variant": name, **{f"seed +{k}": f"{r[MAP_COLUMNS[0]]:.1f} / {r[MAP_COLUMNS[1]]:.1f}"
                                 for k, r in enumerate(rows)}}
            for name, rows in per_seed.items()]


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
    if recipe in TEST_TASKS:
        test = sum(seconds.get(t, 0.0) for t in TEST_TASKS[recipe]) / max(num_test, 1)
        svm = json.loads((folder / runs.run_file(layout.svm_model(recipe))).read_text())
        svm_stage, svm_fit = seconds.get(f"Svm:{recipe}", 0.0), sum(c["seconds"] for c in svm["classes"].values())
    else:
        detection = json.loads((folder / runs.run_file(layout.detections_file(recipe))).read_text())
        test, svm_stage, svm_fit = detection["seconds_per_image"], None, None
    return {"variant": name, "mAP (VOC07 11-pt)": 100 * metrics["mAP_voc07"],
            "mAP (VOC2010+)": 100 * metrics["mAP_voc2010"], "train s": train,
            "SVM stage s": svm_stage, "SVM fitting s": svm_fit, "test s/img": test}


def velocity_row(base_row: dict, folder: Path, recipe: str, times: dict[str, float], base_times: dict[str, float],
                 test_split: str) -> dict:
    """``base_row`` (:func:`row`) with the velocities table's columns: which proposals, how many per test image,
    and the test seconds per image with the proposals' (selective search's stage seconds; a Faster R-CNN's
    proposals are part of its detection run record)."""
    reports = folder / "features_cache" / "reports"
    if recipe in FASTER_RCNN:
        detection = json.loads((folder / runs.run_file(layout.detections_file(recipe))).read_text())
        proposals, with_proposals = f"RPN {detection['proposals_per_image']:.0f}", base_row["test s/img"]
    else:
        report = json.loads((reports / "proposals.json").read_text())[test_split]
        proposals = f"selective search {report['boxes_per_image']:.0f}"
        seconds = {**base_times, **times}.get("Proposals:test", 0.0)
        with_proposals = base_row["test s/img"] + seconds / max(report["images"], 1)
    columns = list(base_row)
    merged = {**base_row, "proposals": proposals, "test s/img with proposals": with_proposals}
    order = [*columns[:3], "proposals", *columns[3:], "test s/img with proposals"]
    return {key: merged[key] for key in order}


def per_class_rows(folder: Path, recipes: list[str]) -> list[dict]:
    """Per-class AP of the full run, both definitions, one row per class and recipe."""
    rows = []
    for recipe in recipes:
        metrics = json.loads((folder / "features_cache" / "reports" / f"map_{recipe}.json").read_text())
        for name, ap07 in metrics["AP_voc07"].items():
            rows.append({"recipe": recipe, "class": name, "ground truth": str(metrics["num_positives"][name]),
                         "AP (VOC07 11-pt)": 100 * ap07, "AP (VOC2010+)": 100 * metrics["AP_voc2010"][name]})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    for r in rows:
        cells = ["-" if v is None else v.format(1 if "AP" in k else 2) if isinstance(v, Spread)
                 else f"{v:.1f}" if "AP" in k else f"{v:.2f}" if isinstance(v, float) else str(v)
                 for k, v in r.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PEER_ROW = "torchvision Faster R-CNN, same backbone, same training time (peer)"


def peer_row(base: Path, seconds: float) -> dict:
    """The peer (:mod:`bench.peer`) trained in the full run's folder for ``seconds``, as a velocities row."""
    env = {**os.environ, "PYTHONPATH": f"{base}{os.pathsep}{REPO}"}
    print(f"torchvision peer for {seconds:.0f} s ...", flush=True)
    subprocess.run([sys.executable, "-m", "bench.peer", "--seconds", str(seconds)], cwd=base, env=env, check=True)
    summary = json.loads((base / "features_cache" / "peer" / "summary.json").read_text())
    return {"variant": PEER_ROW, "mAP (VOC07 11-pt)": 100 * summary["mAP_voc07"],
            "mAP (VOC2010+)": 100 * summary["mAP_voc2010"], "proposals": "RPN (torchvision's defaults)",
            "train s": seconds, "SVM stage s": None, "SVM fitting s": None,
            "test s/img": summary["test_seconds_per_image"],
            "test s/img with proposals": summary["test_seconds_per_image"]}


def plot_velocities(rows: list[dict], path: Path, dataset: str) -> None:
    """Test seconds per image (proposals included, log scale) against mAP (VOC07), one point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        x, y = r["test s/img with proposals"], r[MAP_COLUMNS[0]].mean
        ax.scatter([x], [y])
        ax.annotate(r["variant"].split(" (")[0].split(":")[0] + (" joint" if "joint" in r["variant"] else ""),
                    (x, y), textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax.set(xscale="log", xlabel="test seconds per image, proposals included", ylabel="mAP, VOC07 11-point",
           title=f"Velocities on {dataset}")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a whole number >= 1")
    return value


def folder_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="a VOC dataset instead of the generated default one")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change a base parameter (the value is read as YAML); repeatable")
    parser.add_argument("--skip", action="append", default=[], metavar="TEXT",
                        help="leave out the variants whose name contains TEXT; repeatable")
    parser.add_argument("--seeds", type=positive, default=1, metavar="K",
                        help="run every variant K times, adding k = 0 .. K-1 to the seeds of finetune, sppnet, "
                        "fast_rcnn, svm and bbox (never synthetic.seed or proposals.seed: the data stay fixed); "
                        "mAP as mean +- sample standard deviation (ddof=1) over the K runs (default 1: one run, "
                        "the seeds of params.yaml)")
    parser.add_argument("--workdir", type=Path, help="keep the workspaces in this folder; a later run with the "
                        "same folder reuses them, and Luigi reruns only what changed")
    parser.add_argument("--report", type=Path, metavar="PATH", help="write the markdown report here (and the "
                        "JSON one to PATH with the suffix .json) instead of features_cache/reports/")
    parser.add_argument("--velocities", action="store_true", help="only the velocities table: R-CNN, SPP-net, Fast "
                        "R-CNN (+ OHEM, + SVD) and Faster R-CNN (alternating, joint), all trained in the full run; "
                        "also a plot of test seconds per image against mAP")
    args = parser.parse_args(argv)
    base_params = yaml.safe_load((REPO / "params.yaml").read_text())
    if args.data_root:
        base_params["data"].update(root=str(Path(args.data_root).resolve()), on_error="skip")
    for assignment in args.set:
        apply_setting(base_params, assignment)
    chosen = {name: VARIANTS[name] for name in VELOCITIES} if args.velocities else VARIANTS
    variants = {name: v for name, v in chosen.items() if not any(text in name for text in args.skip)}
    if args.velocities:  # the full run trains every recipe; each variant then only reads its own
        base_params["detect"]["recipes"] = list(dict.fromkeys(recipe for recipe, _ in variants.values()))
    scratch = args.workdir or Path(tempfile.mkdtemp(prefix="rcnn-ablation-"))
    per_seed: dict[str, list[dict]] = {name: [] for name in variants}
    try:
        first_times: dict[str, float] = {}
        for k in range(args.seeds):
            # seed 0 keeps the folders of a run without --seeds, so an earlier --workdir is reused
            home = scratch if k == 0 else scratch / f"seed-{k}"
            params = seed_params(base_params, k)
            base = home / "base"
            if not base.exists():
                if k == 0:
                    scratch_project(base, params)
                else:
                    variant_copy(scratch / "base", base)
            write_params(base, params)
            label = "" if args.seeds == 1 else f" (seed +{k})"
            print(f"full pipeline{label} in {base} ...", flush=True)
            # a stage the seed did not reach keeps its time of seed 0's full run
            base_times = {**first_times, **run_pipeline(base)}
            if k == 0:
                first_times = base_times
                classes = per_class_rows(base, base_params["detect"]["recipes"])
            for name, (recipe, changes) in variants.items():
                folder = home / folder_name(name)
                if not folder.exists():
                    variant_copy(base, folder)
                write_params(folder, variant_params(params, recipe, changes))
                print(f"variant {name!r}{label} ...", flush=True)
                times = run_pipeline(folder)
                test_split = base_params["data"]["test_split"]
                measured = row(name, folder, recipe, times, base_times, test_split)
                if args.velocities:
                    measured = velocity_row(measured, folder, recipe, times, base_times, test_split)
                per_seed[name].append(measured)
        if args.velocities and "faster_rcnn" in base_params["detect"]["recipes"]:
            per_seed[PEER_ROW] = [peer_row(scratch / "base", per_seed[VELOCITIES[5]][0]["train s"])]
    finally:
        if not args.workdir:
            shutil.rmtree(scratch, ignore_errors=True)
    rows = [summarise(seed_rows) for seed_rows in per_seed.values()]
    dataset = args.data_root or "the generated default dataset"
    command = " ".join(["python -m bench.ablation", *(argv if argv is not None else sys.argv[1:])])
    sections = seeded_sections(base_params)
    if args.seeds == 1:
        spread, full_run = "", "the full run"
    else:
        spread = (f"Each mAP is the mean ± the sample standard deviation (ddof=1) over {args.seeds} seeds: seed +k "
                  f"adds k to the seeds of {', '.join(sections)} (the data and proposals fixed); times are means "
                  f"over the seeds.\n\n")
        full_run = "the full run of seed +0"
    report = (f"Ablations on {dataset} (test split), measured by `{command}`:\n\n{spread}{markdown(rows)}\n")
    if args.seeds > 1:
        report += f"mAP of each seed (VOC07 11-pt / VOC2010+):\n\n{markdown(per_seed_table(per_seed))}\n"
    report += f"Per-class AP of {full_run}:\n\n{markdown(classes)}"
    kind = "velocities" if args.velocities else "ablation"
    name = f"{kind}-{Path(args.data_root).resolve().name}.md" if args.data_root else f"{kind}.md"
    path = args.report or REPO / "features_cache" / "reports" / name
    write_text(path, report)
    figures = {
        "command": command, "dataset": dataset, "seeds": args.seeds,
        "seed_offsets": list(range(args.seeds)), "seeded_sections": sections, "fixed_seeds": list(DATA_SEEDS),
        "std": "sample standard deviation over the seeds (ddof=1); null for one seed",
        "variants": [{**{k: v.as_json() if isinstance(v, Spread) else v for k, v in summary.items()},
                      "per_seed": seed_rows} for summary, seed_rows in zip(rows, per_seed.values())],
        "per_class": classes,
    }
    write_text(path.with_suffix(".json"), json.dumps(figures, indent=2) + "\n")
    if args.velocities:
        plot_velocities(rows, path.with_suffix(".png"), dataset)
    print(report)
    return report


if __name__ == "__main__":
    main()
