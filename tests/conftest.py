"""Shared fixtures: a tiny generated dataset, indexed, in a workspace laid out like the repository;
its proposals and SPP pyramids; the subprocesses of a test. Plain helpers live in ``helpers.py``."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# The test process computes as every stage run does, as its subprocesses do: a stage run in-process and one in a
# child process (a killed and resumed run, say) must round alike. Importing stages pins the CPU kernels; it comes
# first, before numpy loads (stages.core.kernels).
import stages  # noqa: I001
from helpers import Processes, run_spp, spp_config, tiny_params, write_params

from stages import index, proposals, synthetic
from stages.core import layout
from stages.core.config import Config, load_config
from stages.core.kernels import one_blas_thread


@pytest.fixture(scope="session", autouse=True)
def one_blas_thread_as_in_stage_runs():
    with one_blas_thread():
        yield


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


def _private_copy(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of ``source`` in the test's own folder, made the working directory."""
    folder = tmp_path / "ws"
    shutil.copytree(source, folder, symlinks=True)
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def workspace(tiny_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the tiny workspace, made the working directory."""
    return _private_copy(tiny_workspace, tmp_path, monkeypatch)


@pytest.fixture
def tiny_config(workspace: Path) -> Config:
    return load_config()


@pytest.fixture(scope="session")
def spp_upstream(tmp_path_factory: pytest.TempPathFactory, tiny_workspace: Path) -> Path:
    """The tiny workspace with proposals and pyramids (:func:`helpers.spp_config`) of every shard of both
    splits (built once per session)."""
    folder = tmp_path_factory.mktemp("spp-upstream")
    shutil.copytree(tiny_workspace, folder, symlinks=True, dirs_exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        cfg = spp_config(load_config())
        for split in cfg.data.splits:
            for shard in cfg.sharding.shards:
                proposals.run(cfg.proposals, "raise", split, shard, cfg.sharding.num_shards,
                              layout.proposals_shard(split, shard), num_workers=1)
                run_spp(cfg, split, shard, layout.spp_shard(split, shard))
    return folder


@pytest.fixture
def spp_workspace(spp_upstream: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of :func:`spp_upstream`, made the working directory."""
    return _private_copy(spp_upstream, tmp_path, monkeypatch)


@pytest.fixture
def processes():
    """Start subprocesses in their own sessions (:class:`helpers.Processes`); all are killed at the end."""
    started = Processes()
    yield started
    started.close()
