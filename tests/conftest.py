"""Shared fixtures: a tiny generated dataset, indexed, in a workspace laid out like the repository."""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import yaml

from stages import index, synthetic
from stages.core import layout
from stages.core.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
BCCD = REPO.parent / "shared" / "datasets" / "BCCD"

# Small enough that the whole DAG runs in seconds; still several classes, splits and shards.
TINY = {
    "synthetic": {"num_trainval": 6, "num_test": 4, "min_side": 96, "max_side": 160, "max_object_size": 64},
    "proposals": {"max_side": 160, "max_boxes": 300},
    "finetune": {"input_size": 64, "batch_size": 8, "iterations": 3, "lr_step": 2},
    "features": {"batch_size": 16},
    "sppnet": {"scales": [128], "max_side": 200, "hidden": 64, "batch_size": 32, "iterations": 5, "lr_step": 3},
    "svm": {"norm_sample": 500, "retrain_every": 200},
    "evaluate": {"gallery": 2},
    "runtime": {"num_workers": 2},
}


def tiny_params() -> dict:
    """params.yaml with the TINY overrides, as a plain mapping."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    return params


def write_params(folder: Path, params: dict) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with params.yaml, the generated dataset and its index (built once per session)."""
    folder = tmp_path_factory.mktemp("workspace")
    write_params(folder, tiny_params())
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        cfg = load_config()
        synthetic.run(cfg.synthetic, layout.SYNTHETIC)
        index.run(cfg.data, layout.INDEX, num_workers=1)
    finally:
        os.chdir(cwd)
    return folder


@pytest.fixture
def workspace(tiny_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the tiny workspace, made the working directory."""
    folder = tmp_path / "ws"
    shutil.copytree(tiny_workspace, folder, symlinks=True)
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def tiny_config(workspace: Path) -> Config:
    return load_config()


def replace_section(cfg: Config, section: str, **changes) -> Config:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})
