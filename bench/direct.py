"""The velocities table where DVC does not run: ``python -m bench.direct`` in a project folder.

For a machine that has the numerical packages but not DVC (the GPU machine lent now and then has torch, not
DVC): every stage instance the velocities recipes need (:data:`bench.ablation.VELOCITIES`), in the stage
table's order, in this process (:func:`stages.core.stage.call`, as ``python -m stages`` runs them), then the
peer trained for the alternating chain's training time, then ``make velocities``' table, per-class APs and
plot as ``features_cache/reports/velocities-direct.*``. Seconds are filed under the ablation runner's keys
(:func:`pipeline.timing_key`), so the rows are computed as there.

An instance whose outputs all exist is skipped: bring selective search's proposals (and their run records,
whose wall seconds count as the stage's) along where OpenCV's contrib modules are missing. Nothing checks
that existing outputs are current (no record is kept), so start from a fresh copy. An instance that fails is reported and the others go on; those that need its outputs are
skipped, and the table has the rows whose evaluation exists.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from dataclasses import replace
from pathlib import Path

from bench.ablation import (PEER_ROW, VARIANTS, VELOCITIES, markdown, peer_row, per_class_rows, plot_velocities,
                            row, summarise, velocity_row)
from pipeline import timing_key
from stages.core import runs
from stages.core.atomic import write_text
from stages.core.config import Config, load_config
from stages.core.layout import CACHE
from stages.core.stage import Refs, address, call, instances
from stages.table import TABLE

REPORT = CACHE / "reports" / "velocities-direct.md"
ALTERNATING = VELOCITIES[5]


def run_all(cfg: Config) -> tuple[dict[str, float], list[str]]:
    """Run every instance whose outputs are not all there; the seconds per timing key, and what failed or was
    skipped for a missing input."""
    times: dict[str, float] = {}
    failed: list[str] = []
    for stage, item in instances(TABLE, cfg):
        refs, name, key = Refs.of(cfg, item), address(stage, item), timing_key(stage, item, cfg)
        outputs = [Path(out.path) for out in stage.outputs(refs).values()]
        if all(path.exists() for path in outputs):  # run elsewhere: the wall seconds its run records hold
            seconds = sum((runs.read(path) or {}).get("wall_seconds", 0.0) for path in outputs)
            times[key] = times.get(key, 0.0) + seconds
            continue
        missing = [str(path) for path in stage.inputs(refs).values() if not Path(path).exists()]
        if missing:
            print(f"direct: {name} skipped, its inputs are missing: {', '.join(missing)}", flush=True)
            failed.append(name)
            continue
        print(f"direct: running {name}", flush=True)
        start = time.perf_counter()
        try:
            call(stage, cfg, item)
        except Exception:  # reported; the instances that do not need it still run
            traceback.print_exc()
            failed.append(name)
            continue
        seconds = time.perf_counter() - start
        print(f"direct: {name} ran in {seconds:.1f} s", flush=True)
        times[key] = times.get(key, 0.0) + seconds
    return times, failed


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-peer", action="store_true", help="leave out torchvision's Faster R-CNN")
    args = parser.parse_args(argv)
    cfg = load_config()
    recipes = tuple(VARIANTS[name][0] for name in VELOCITIES)
    cfg = replace(cfg, detect=replace(cfg.detect, recipes=recipes))
    times, failed = run_all(cfg)
    folder, split = Path.cwd(), cfg.data.test_split
    per_variant = {}
    for name in VELOCITIES:
        recipe = VARIANTS[name][0]
        if (CACHE / "reports" / f"map_{recipe}.json").exists():
            per_variant[name] = velocity_row(row(name, folder, recipe, times, {}, split), folder, recipe, times, {},
                                             split)
    if not args.no_peer and ALTERNATING in per_variant:
        per_variant[PEER_ROW] = peer_row(folder, per_variant[ALTERNATING]["train s"])
    rows = [summarise([r]) for r in per_variant.values()]
    done = [VARIANTS[name][0] for name in per_variant if name in VARIANTS]
    report = (f"Velocities on {cfg.data.root} (test split), measured by `python -m bench.direct`, every stage in "
              f"one process:\n\n{markdown(rows)}\nPer-class AP:\n\n{markdown(per_class_rows(folder, done))}")
    if failed:
        report += f"\nFailed or skipped: {', '.join(failed)}\n"
    write_text(REPORT, report)
    write_text(REPORT.with_suffix(".json"), json.dumps({"seconds": times, "rows": list(per_variant.values()),
                                                         "failed": failed}, indent=2) + "\n")
    plot_velocities(rows, REPORT.with_suffix(".png"), cfg.data.root)
    print(report)
    return report


if __name__ == "__main__":
    main()
