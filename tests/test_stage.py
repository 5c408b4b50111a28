"""The binding of stage arguments, and the CPU kernels every stage run gets (stages/core/stage.py)."""
from __future__ import annotations

import os

import pytest

from threadpoolctl import threadpool_info, threadpool_limits

from helpers import REPO
from stages.core import stage
from stages.core.config import load_config
from stages.core.kernels import PINNED_CPU_KERNELS
from stages.core.stage import Refs, Stage, arguments, bindings, metrics


@pytest.fixture(scope="module")
def repo_config():
    return load_config(REPO / "params.yaml")


def test_call_pins_the_kernels_and_runs_blas_on_one_thread(monkeypatch, repo_config):
    seen, blas_threads = {}, []
    for name in PINNED_CPU_KERNELS:
        monkeypatch.delenv(name)  # set for the session (conftest): restored after the test
    recall = Stage(name="recall", help="", outputs=lambda r: {"metrics_path": metrics("m.json")})
    def run(splits, num_shards, metrics_path):  # recall's parameters: what the environment is when it runs
        seen.update(os.environ)
        blas_threads.extend(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")

    monkeypatch.setattr(Stage, "entry", lambda self: run)
    with threadpool_limits(limits=2, user_api="blas"):
        stage.call(recall, repo_config, {})
    assert all(seen[name] == value for name, value in PINNED_CPU_KERNELS.items())
    assert blas_threads and set(blas_threads) == {1}


def test_arguments_bind_by_name_and_type(repo_config):
    recall = Stage(name="recall", help="", fan_out=(), outputs=lambda r: {"metrics_path": metrics("m.json")})
    assert set(bindings(recall)) == {"splits", "num_shards"}
    args = arguments(recall, repo_config, {})
    assert args["splits"] == repo_config.data.splits and args["num_shards"] == repo_config.sharding.num_shards
    assert str(args["metrics_path"]) == "m.json"


def test_refs_refuse_a_dimension_the_stage_does_not_fan_out_over(repo_config):
    refs = Refs.of(repo_config, {"split": "test"})
    assert refs.split == "test" and refs.splits == repo_config.data.splits
    with pytest.raises(AttributeError, match="does not fan out over 'shard'"):
        refs.shard


def test_unknown_fan_out_is_a_declaration_error():
    with pytest.raises(ValueError, match="unknown fan-out"):
        Stage(name="x", help="", outputs=lambda r: {}, fan_out=("epoch",))
