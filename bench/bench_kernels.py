"""What the pinned CPU kernels cost (:mod:`stages.core.kernels`): the stages that compute with numpy's and scipy's
BLAS, run side by side on the same R-CNN features, pinned and native.

* pinned: what every stage run gets, OpenBLAS's Haswell (AVX2) kernels and one BLAS thread;
* native: the kernels OpenBLAS picks for this CPU (its AVX-512 ones where the CPU has them) and its default threads.

The stages are ``svm``, ``bbox`` and ``detect`` of recipe ``rcnn`` (``stages.core.stage.arguments`` binds them as a
run does), on a copy of the repository's index and R-CNN feature cache in a scratch folder: run ``make run``
first; the repository's artifacts stay as they are. The two settings alternate, :data:`ROUNDS` times each, in
fresh processes (OpenBLAS reads its kernel choice at load). Printed: each stage's median seconds under both, the
ratio, and whether both wrote the same bytes: on a CPU with AVX-512 they differ, which is why stages pin.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import REPO, print_table
from stages.core import layout

ROUNDS = 3
STAGES = ("svm", "bbox", "detect")
RECIPE = "rcnn"
DRIVER = """
import contextlib, json, sys, time
from stages.core.config import load_config
from stages.core.kernels import one_blas_thread
from stages.core.stage import arguments
from stages.table import TABLE

cfg, seconds = load_config(), {}
for name in sys.argv[3:]:
    stage = next(s for s in TABLE if s.name == name)
    start = time.perf_counter()
    with one_blas_thread() if sys.argv[1] == "pinned" else contextlib.nullcontext():
        stage.entry()(**arguments(stage, cfg, {"recipe": sys.argv[2]}))
    seconds[name] = time.perf_counter() - start
print(json.dumps(seconds))
"""


def native_kernels() -> str:
    """The OpenBLAS kernel set numpy loads on this CPU when nothing pins it."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    code = "import numpy, threadpoolctl; print(threadpoolctl.threadpool_info()[0].get('architecture'))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def scratch_copy(folder: Path) -> bool:
    """params.yaml, the index and the R-CNN features of the repository, for the stages to read; ``False``
    (and why printed) when the repository has none yet."""
    parts = (layout.INDEX, layout.CACHE / "features" / RECIPE, layout.SYNTHETIC)
    missing = [str(part) for part in parts if not (REPO / part).is_dir()]
    if missing:
        print(f"{', '.join(missing)} not found: run `make run` first (the default pipeline writes them); skipped")
        return False
    shutil.copy(REPO / "params.yaml", folder)
    for part in parts:
        shutil.copytree(REPO / part, folder / part)
    return True


def outputs_digest(folder: Path) -> str:
    paths = [layout.svm_model(RECIPE), layout.bbox_model(RECIPE), layout.detections_file(RECIPE)]
    return hashlib.sha256(b"".join((folder / p).read_bytes() for p in paths)).hexdigest()[:12]


def run_once(folder: Path, setting: str, coretype: str) -> tuple[dict[str, float], str]:
    env = {**os.environ, "OPENBLAS_CORETYPE": coretype, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", DRIVER, setting, RECIPE, *STAGES], cwd=folder, env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1]), outputs_digest(folder)


def main() -> None:
    from stages.core.kernels import PINNED_CPU_KERNELS

    settings = {"native": native_kernels(), "pinned": PINNED_CPU_KERNELS["OPENBLAS_CORETYPE"]}
    seconds: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    digests: dict[str, set[str]] = {name: set() for name in settings}
    with tempfile.TemporaryDirectory(prefix="rcnn-bench-kernels-") as scratch:
        folder = Path(scratch)
        if not scratch_copy(folder):
            return
        print(f"OpenBLAS kernels: native {settings['native']}, pinned {settings['pinned']}; {ROUNDS} rounds each")
        for _ in range(ROUNDS):
            for name, coretype in settings.items():
                timed, digest = run_once(folder, name, coretype)
                seconds[name].append(timed)
                digests[name].add(digest)
    rows = []
    for stage in (*STAGES, "all"):
        median = {name: statistics.median(sum(r.values()) if stage == "all" else r[stage] for r in runs)
                  for name, runs in seconds.items()}
        rows.append({"stage (recipe rcnn)": stage, "native s": median["native"], "pinned s": median["pinned"],
                     "pinned / native": median["pinned"] / median["native"]})
    print_table(rows)
    same = digests["native"] == digests["pinned"] and len(digests["native"]) == 1
    print(f"outputs: native {sorted(digests['native'])}, pinned {sorted(digests['pinned'])}: "
          f"{'the same bytes' if same else 'different bytes'}")


if __name__ == "__main__":
    main()
