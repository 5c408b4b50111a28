"""``make verify``: a fresh run in a scratch copy compared output by output with a recorded dvc.lock."""
from __future__ import annotations

import os

import pytest

import pipeline
from helpers import BIN, project_copy, sh, tiny_params
from pipeline.__main__ import output_hashes, prune_lock, verify
from pipeline.project import write_params


def tiny() -> dict:
    params = tiny_params()
    params["sharding"]["shards"] = [0]
    params["detect"]["recipes"] = ["rcnn"]
    return params


def test_output_hashes_reads_every_stage_output(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text("schema: '2.0'\nstages:\n  a:\n    cmd: x\n    outs:\n    - path: f.h5\n      md5: abc\n"
                    "  b:\n    cmd: y\n    outs:\n    - path: d\n      md5: def.dir\n    - path: m.json\n      md5: 0\n")
    assert output_hashes(lock) == {"f.h5": "abc", "d": "def.dir", "m.json": 0}


def lock_entry(name: str) -> str:
    return f"  {name}:\n    cmd: python -m stages x\n    outs:\n    - path: features_cache/{name}\n      md5: '0'\n"


def test_prune_lock_drops_exactly_the_records_of_instances_the_params_no_longer_have(tmp_path, monkeypatch):
    write_params(tmp_path, tiny())  # recipes [rcnn], shards [0]
    monkeypatch.chdir(tmp_path)
    kept = ["index", "proposals@trainval-0", "svm@rcnn"]
    stale = ["proposals@trainval-1", "svm@sppnet", "no_such_stage"]
    lock = tmp_path / "dvc.lock"
    lock.write_text("schema: '2.0'\nstages:\n" + "".join(lock_entry(n) for n in [kept[0], *stale, *kept[1:]]))
    pipeline.config.cache_clear()
    try:
        assert prune_lock(lock) == stale
        assert lock.read_text() == "schema: '2.0'\nstages:\n" + "".join(lock_entry(n) for n in kept)
        assert prune_lock(lock) == [] and prune_lock(tmp_path / "absent.lock") == []
    finally:
        pipeline.config.cache_clear()  # later tests read their own params.yaml


@pytest.mark.slow
def test_verify_accepts_a_reproduced_record_and_names_a_tampered_output(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")  # verify runs dvc
    reference = project_copy(tmp_path / "reference", tiny())
    sh(reference, "dvc", "repro", "--quiet")
    assert verify(reference / "dvc.lock", tiny()) == 0
    assert "differs" not in capsys.readouterr().out
    lock = reference / "dvc.lock"
    lock.write_text(lock.read_text().replace("path: features_cache/bbox/rcnn.h5\n      hash: md5\n      md5: ",
                                             "path: features_cache/bbox/rcnn.h5\n      hash: md5\n      md5: 0"))
    assert verify(lock, tiny()) == 1
    assert "differs: features_cache/bbox/rcnn.h5" in capsys.readouterr().out
