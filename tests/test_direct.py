"""The runner without DVC (bench.direct): the stage table's instances in order, what exists skipped (its recorded
wall seconds kept), a failure reported and what needs its outputs skipped, seconds under the ablation keys."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from bench import direct
from stages.core import layout, runs
from stages.core.config import load_config
from stages.core.stage import Refs, address, instances
from stages.table import TABLE


def test_run_all_runs_the_missing_instances_in_order_and_skips_what_a_failure_starves(workspace, monkeypatch):
    cfg = load_config()
    cfg = replace(cfg, detect=replace(cfg.detect, recipes=("fast_rcnn",)))
    ran: list[str] = []

    def fake_call(stage, cfg, item):
        if stage.name == "fast_rcnn_train":
            raise RuntimeError("planted")
        ran.append(address(stage, item))
        for out in stage.outputs(Refs.of(cfg, item)).values():
            Path(out.path).parent.mkdir(parents=True, exist_ok=True)
            Path(out.path).touch()

    monkeypatch.setattr(direct, "call", fake_call)
    test_shard = layout.proposals_shard(cfg.data.test_split, 0)  # run elsewhere, 3 s by its record
    test_shard.parent.mkdir(parents=True)
    test_shard.touch()
    runs.record(test_shard, {"wall_seconds": 3.0})
    times, failed = direct.run_all(cfg)

    order = [address(stage, item) for stage, item in instances(TABLE, cfg)]
    assert ran == [name for name in order if name in ran]  # the table's order
    assert {"synthetic", "index", f"proposals@{cfg.data.test_split}-0"}.isdisjoint(ran)  # their outputs exist
    assert failed[0] == "fast_rcnn_train@fast_rcnn" and "fast_rcnn_detect@fast_rcnn" in failed
    assert set(ran) | set(failed) | {"synthetic", "index", f"proposals@{cfg.data.test_split}-0"} == set(order)
    assert times["Proposals:test"] >= 3.0 and "FastRcnnTrain:fast_rcnn" not in times
    assert "Proposals:train" in times and "CocoGt" in times

    ran.clear()
    monkeypatch.setattr(direct, "call", lambda stage, cfg, item: ran.append(address(stage, item)))
    direct.run_all(cfg)  # the fixed stage runs now, and nothing else that exists
    assert ran[0] == "fast_rcnn_train@fast_rcnn" and set(ran) <= set(failed)
