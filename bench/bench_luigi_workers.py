"""Luigi workers: two (``--workers 2``) vs one on the sharded proposal stage, same images, one run.

The generated default dataset (``params.yaml`` as it is, with ``runtime.num_workers: 1``
so that each task is one process, and ``sharding.shards: [0, 1]``) is generated and
indexed once by Luigi (its ``Index`` task). Then, in two fresh copies of that prepared
workspace, the ``Proposals`` tasks (2 splits x 2 shards) run with one Luigi worker and
with two, each in its own process (``luigi.build(..., local_scheduler=True)``, what the
``luigi`` command does); only that call is timed. Both runs must write byte-identical
shard files; the ratio of their wall-clock times is the speed-up.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from bench.common import REPO, Workspace, print_table
from pipeline.project import scratch_project
from stages.core import layout

# Run inside the workspace: schedule the given tasks with N Luigi workers, time only that.
_BUILD = """
import json, sys, time
import luigi
from luigi.execution_summary import LuigiStatusCode
import pipeline

workers, what = int(sys.argv[1]), sys.argv[2]
cfg = pipeline.config()
if what == "index":
    tasks = [pipeline.Index()]
else:
    tasks = [pipeline.Proposals(split=s, shard=k) for s in dict.fromkeys(cfg.data.splits) for k in cfg.sharding.shards]
start = time.perf_counter()
result = luigi.build(tasks, workers=workers, local_scheduler=True, detailed_summary=True, log_level="WARNING")
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "ok": result.status == LuigiStatusCode.SUCCESS, "tasks": len(tasks)}))
"""


def build(folder: Path, workers: int, what: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(folder)}
    result = subprocess.run([sys.executable, "-c", _BUILD, str(workers), what], cwd=folder, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.strip():
        raise RuntimeError(f"luigi ({what}, {workers} workers) failed:\n{result.stdout}\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if not report["ok"]:
        raise RuntimeError(f"luigi ({what}, {workers} workers) did not succeed:\n{result.stderr[-3000:]}")
    return report


def shards(folder: Path) -> dict[str, bytes]:
    root = folder / layout.PROPOSALS
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("shard-*.h5"))}


def main() -> list[dict]:
    rows = []
    with Workspace() as ws:
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["runtime"]["num_workers"] = 1
        params["sharding"]["shards"] = [0, 1]
        prepared = scratch_project(ws.folder / "prepared", params)
        build(prepared, 1, "index")  # Synthetic and Index: not timed
        images = params["synthetic"]["num_trainval"] + params["synthetic"]["num_test"]

        results = {}
        for workers in (1, 2):
            folder = ws.folder / f"workers-{workers}"
            shutil.copytree(prepared, folder, symlinks=True)
            results[workers] = build(folder, workers, "proposals"), shards(folder)
        (one, one_shards), (two, two_shards) = results[1], results[2]
        identical = len(one_shards) == 2 * len(params["sharding"]["shards"]) and one_shards == two_shards
        for workers, (report, _) in results.items():
            rows.append({
                "configuration": f"luigi --workers {workers}",
                "tasks": report["tasks"],
                "images": images,
                "wall s": report["seconds"],
                "s/img": report["seconds"] / images,
                "speed-up": one["seconds"] / report["seconds"],
                "identical": identical,
            })
    print(f"\nProposal tasks (2 splits x 2 shards, runtime.num_workers 1) on the generated default dataset, "
          f"two Luigi workers vs one, {os.cpu_count()} cores (target >= 1.7x):")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
