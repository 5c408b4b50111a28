"""The binding of stage arguments and the CPU-kernel pins every stage run gets (stages/core/stage.py)."""
from __future__ import annotations

import os

import pytest

from helpers import REPO
from stages.core import stage
from stages.core.config import load_config
from stages.core.stage import PINNED_CPU_KERNELS, Refs, Stage, arguments, bindings, metrics, pin_cpu_kernels


@pytest.fixture(scope="module")
def repo_config():
    return load_config(REPO / "params.yaml")


def test_the_test_process_runs_pinned():
    assert all(os.environ.get(name) == value for name, value in PINNED_CPU_KERNELS.items())


def test_pins_are_set_unless_the_environment_sets_them(monkeypatch):
    for name in PINNED_CPU_KERNELS:
        monkeypatch.delenv(name)  # set for the session (conftest): restored after the test
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    pin_cpu_kernels()
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2" and os.environ["ATEN_CPU_CAPABILITY"] == "avx2"
    assert os.environ["MKL_CBWR"] == "COMPATIBLE"


def test_call_pins_the_kernels_before_the_stage_runs(monkeypatch, repo_config):
    seen = {}
    for name in PINNED_CPU_KERNELS:
        monkeypatch.delenv(name)
    recall = Stage(name="recall", help="", outputs=lambda r: {"metrics_path": metrics("m.json")})
    def run(splits, num_shards, metrics_path):  # recall's parameters: what the environment is when it runs
        seen.update(os.environ)

    monkeypatch.setattr(Stage, "entry", lambda self: run)
    stage.call(recall, repo_config, {})
    assert all(seen[name] == value for name, value in PINNED_CPU_KERNELS.items())


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
