"""``python -m pipeline``: what follows from the stage table.

* ``dvc-yaml``: print the ``dvc.yaml`` the table generates (``make dvc.yaml``);
* ``clean``: delete every artifact the table's stage instances write under the
  current params, and the run records and checkpoints (``make clean``); tracked
  files (``features_cache/README.md``, DVC's ``.gitignore`` files, reports
  written outside the DAG) stay;
* ``prune-lock``: drop from ``dvc.lock`` the records of stage instances the
  table no longer has under the current params (a recipe turned off, a shard
  fewer): ``dvc repro`` keeps them, and ``verify`` would then find their
  outputs missing (``make run`` prunes after ``dvc repro``);
* ``verify``: run the pipeline with ``dvc repro`` in a scratch copy of the
  project (code, ``params.yaml``, ``dvc.yaml``) and compare every output's hash
  with the committed ``dvc.lock`` (``make verify``): the committed record must be
  what the committed code produces, on this machine too.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from pipeline import config, dvc_yaml
from pipeline.project import REPO, scratch_project
from stages.core import layout
from stages.core.atomic import write_text
from stages.core.stage import Refs, address, instances
from stages.table import TABLE


def artifact_paths() -> list[Path]:
    cfg = config()
    outputs = [Path(out.path) for stage, item in instances(TABLE, cfg)
               for out in stage.outputs(Refs.of(cfg, item)).values()]
    return [*dict.fromkeys(outputs), layout.RUNS, layout.CHECKPOINTS, layout.CACHE / "show"]


def clean() -> None:
    for path in artifact_paths():
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        print(f"removed {path}")


def prune_lock(lock_file: Path = Path("dvc.lock")) -> list[str]:
    """Remove the entries of ``lock_file`` that name no stage instance of the table under the current params;
    return their names. The rest of the file stays byte for byte as DVC wrote it (DVC's own YAML round trip)."""
    from dvc.utils.serialize import dumps_yaml, parse_yaml_for_update

    if not lock_file.is_file():
        return []
    lock = parse_yaml_for_update(lock_file.read_text(), str(lock_file))
    current = {address(stage, item) for stage, item in instances(TABLE, config())}
    stale = [name for name in lock["stages"] if name not in current]
    for name in stale:
        del lock["stages"][name]
    if stale:
        write_text(lock_file, dumps_yaml(lock))
    return stale


def output_hashes(lock_file: Path) -> dict[str, str]:
    """``{output path: md5}`` of every stage output ``lock_file`` records."""
    stages = yaml.safe_load(lock_file.read_text())["stages"]
    return {out["path"]: out.get("md5", "") for entry in stages.values() for out in entry.get("outs", [])}


def verify(reference: Path = REPO / "dvc.lock", params: dict | None = None) -> int:
    """0 when a fresh ``dvc repro`` (``params``, default the repository's) gives exactly the outputs
    ``reference`` (default the committed ``dvc.lock``) records; else 1, each differing output printed."""
    committed = output_hashes(reference)
    with tempfile.TemporaryDirectory(prefix="rcnn-verify-") as scratch:
        folder = scratch_project(Path(scratch) / "project", params)
        env = {**os.environ, "PYTHONPATH": str(folder)}
        subprocess.run(["dvc", "repro", "--quiet"], cwd=folder, env=env, check=True)
        produced = output_hashes(folder / "dvc.lock")
    differing = sorted(p for p in committed.keys() | produced.keys() if committed.get(p) != produced.get(p))
    for path in differing:
        print(f"differs: {path}: committed {committed.get(path, 'absent')}, produced {produced.get(path, 'absent')}")
    print(f"verify: {len(produced) - len(differing)} of {len(produced)} outputs as the committed dvc.lock records")
    return 1 if differing else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["dvc-yaml", "clean", "prune-lock", "verify"])
    command = parser.parse_args(argv).command
    if command == "verify":
        return verify()
    if command == "prune-lock":
        for name in prune_lock():
            print(f"dvc.lock: removed {name} (no such stage instance under the current params)")
    elif command == "clean":
        clean()
    else:
        sys.stdout.write(dvc_yaml.generate())
    return 0


if __name__ == "__main__":
    sys.exit(main())
