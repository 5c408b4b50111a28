"""``python -m pipeline``: what follows from the stage table.

* ``dvc-yaml``: print the ``dvc.yaml`` the table generates (``make dvc.yaml``);
* ``clean``: delete every artifact the table's stage instances write under the
  current params, and the run records and checkpoints (``make clean``); tracked
  files (``features_cache/README.md``, DVC's ``.gitignore`` files, reports
  written outside the DAG) stay.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from pipeline import config, dvc_yaml
from stages.core import layout
from stages.core.stage import Refs, instances
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["dvc-yaml", "clean"])
    if parser.parse_args(argv).command == "clean":
        clean()
    else:
        sys.stdout.write(dvc_yaml.generate())
    return 0


if __name__ == "__main__":
    sys.exit(main())
