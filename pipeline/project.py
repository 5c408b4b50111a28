"""A scratch copy of the project: its code, a ``params.yaml`` and the ``dvc.yaml`` generated for it, as a DVC repository.

What tests, benchmarks and the ablation runner work in, so that both
orchestrators find the record of completed work (``dvc.lock``) where they
expect it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from stages.core.atomic import write_text

REPO = Path(__file__).resolve().parents[1]
CODE = ("stages", "pipeline")
FILES = ("luigi.cfg", ".dvcignore")


def write_params(folder: Path, params: dict) -> Path:
    """Replace ``params.yaml`` (never edit it in place: it may be hard-linked into another copy), and the
    ``dvc.yaml`` there, if any, with the one generated for these params (``detect.recipes`` shapes it)."""
    from pipeline import dvc_yaml
    from stages.core.config import load_config

    path = folder / "params.yaml"
    write_text(path, yaml.safe_dump(params, sort_keys=False))
    if (folder / "dvc.yaml").is_file():
        write_text(folder / "dvc.yaml", dvc_yaml.generate(load_config(path)))
    return path


def scratch_project(folder: Path, params: dict | None = None) -> Path:
    """``folder`` (created) as a fresh project; ``params`` default to the repository's ``params.yaml``."""
    from dvc.repo import Repo

    folder.mkdir(parents=True)
    for name in CODE:
        shutil.copytree(REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in FILES:
        shutil.copy(REPO / name, folder)
    (folder / "dvc.yaml").touch()  # write_params generates it
    write_params(folder, params if params is not None else yaml.safe_load((REPO / "params.yaml").read_text()))
    Repo.init(str(folder), no_scm=True).close()
    return folder
