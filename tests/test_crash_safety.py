"""Crash safety: a killed, out-of-space or unwritable run never leaves a half-written artifact.

Every kill is a SIGKILL at a named fault point (:mod:`stages.core.faults`, chosen by
``STAGES_KILL_AT``) that the stage reaches for sure, never after a delay:

- ``start``: the proposal stage is entered; ``image-written:N``: the N-th image is in the
  temporary file (``stages.core.store``); ``temporary-complete``: the temporary is written,
  closed and verified, the rename is next; ``renamed``: the artifact is in place, its run
  record (``features_cache/runs/``) is not yet written (``stages.core.atomic``).
- The proposal stage is killed at each point, the feature stages (``features``,
  ``spp_features``) mid-write and ``features`` also once renamed. Each run must die at its
  point (status SIGKILL); the final path then holds nothing or a complete file
  byte-identical to an uninterrupted run, no temporary is read as the artifact and no run
  record is written; a rerun completes byte-identical, removes the killed run's temporaries
  and records the run; and a *rewrite* killed at the same point leaves the previous artifact
  and its run record as they were.
- ``luigi ... Recall --workers 1`` (the tasks run in the Luigi process) is killed inside its
  second proposal task; the rerun runs exactly the stage instances ``dvc.lock`` does not
  record, leaves the recorded ones' lock entries and output files untouched, and the
  artifacts equal a clean run's.
- A full disk (simulated in-process, and a real tiny tmpfs when mounting is allowed) and
  an output folder that cannot be created give an :class:`OutputError` naming the path,
  ``error: ...`` on the command line, and leave previous artifacts intact.

Every subprocess runs in its own session and its whole process group is killed at the
end of the test, whatever happens.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import pytest
import yaml
from helpers import (
    Processes,
    artifacts,
    environment,
    luigi_command,
    project_copy,
    ran_instances,
    run_to_end,
    tiny_params,
)

from stages import proposals
from stages.__main__ import main as cli_main
from stages.core import faults, layout, runs
from stages.core.atomic import OutputError, atomic_dir, atomic_path
from stages.core.config import load_config
from stages.core.errors import PipelineError
from stages.core.store import ArtifactError, PerImageReader

SPLIT = "trainval"
SHARD = layout.proposals_shard(SPLIT, 0)
IMAGES = 8
# A temporary of a shard (stages.core.atomic: mkstemp next to the target).
TEMPORARY = re.compile(r"\.shard-0\.h5\.[a-z0-9_]{8}\.tmp\.h5")


def crash_params() -> dict:
    """A few tiny images in one shard, one worker process."""
    params = tiny_params()
    params["synthetic"].update(num_trainval=IMAGES, num_test=2, min_side=64, max_side=96)
    params["proposals"]["max_side"] = 96
    params["sharding"]["shards"] = [0]
    params["runtime"]["num_workers"] = 1
    return params


def stages_cli(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m stages ARGS`` in ``folder``, with the code there (a project copy's) or else the repository's."""
    return run_to_end([sys.executable, "-m", "stages", *args], folder, timeout=300)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def dies_at(processes: Processes, proc: subprocess.Popen, point: str, log: Path) -> None:
    """Wait for ``proc``, started with ``STAGES_KILL_AT=point``: it must have killed itself there."""
    try:
        proc.wait(timeout=300)
    finally:
        processes.kill(proc)  # and whatever it started (pool workers)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point}:\n{log.read_text(errors='replace')[-3000:]}"


@dataclass(frozen=True)
class Target:
    """A sharded stage run on shard 0 of the training split, and the file it writes."""

    stage: str
    shard: Path

    @property
    def argv(self) -> list[str]:
        return [self.stage, "--split", SPLIT, "--shard", "0"]

    @property
    def record(self) -> Path:
        return runs.run_file(self.shard)


@dataclass(frozen=True)
class Kill:
    """A fault point, and what a first run killed there leaves in the shard's folder."""

    point: str
    shard_in_place: bool
    temporary: bool

    def __str__(self) -> str:
        return self.point


PROPOSAL_TARGET = Target("proposals", SHARD)
PROPOSALS, RECORD = PROPOSAL_TARGET.argv, PROPOSAL_TARGET.record
FEATURES = Target("features", layout.features_shard("rcnn", SPLIT, 0))
SPP_FEATURES = Target("spp_features", layout.spp_shard(SPLIT, 0))
STARTED = Kill("start", shard_in_place=False, temporary=False)
WRITING = Kill(f"image-written:{IMAGES // 2}", shard_in_place=False, temporary=True)
COMPLETE = Kill("temporary-complete", shard_in_place=False, temporary=True)
RENAMED = Kill("renamed", shard_in_place=True, temporary=False)


def project(root: Path, params: dict, upstream: list[list[str]], targets: list[Target]) -> tuple[Path, dict[str, bytes]]:
    """A project copy (its code fixed while other files of the repository change) with the ``upstream``
    stages run, and each target's shard from an uninterrupted run (in a copy)."""
    base = project_copy(root / "base", params)
    for argv in upstream:
        ok(stages_cli(base, *argv))
    reference = root / "reference"
    shutil.copytree(base, reference, symlinks=True)
    for target in targets:
        ok(stages_cli(reference, *target.argv))
    return base, {target.stage: (reference / target.shard).read_bytes() for target in targets}


@pytest.fixture(scope="module")
def crash_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """The dataset generated and indexed, and the proposal shard of an uninterrupted run."""
    return project(tmp_path_factory.mktemp("crash"), crash_params(), [["synthetic"], ["index"]], [PROPOSAL_TARGET])


@pytest.fixture(scope="module")
def feature_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """Proposals (ten per image) too, and the shard of each feature stage. ImageNet features: no fine-tuning."""
    params = crash_params()
    params["proposals"]["max_boxes"] = 10
    params["features"]["model"] = "imagenet"
    return project(tmp_path_factory.mktemp("crash-features"), params, [["synthetic"], ["index"], PROPOSALS],
                   [FEATURES, SPP_FEATURES])


def killed_run(processes: Processes, folder: Path, target: Target, point: str) -> None:
    """Run the stage with ``STAGES_KILL_AT=point``; it must die there."""
    log = folder / f"kill-{target.stage}-{point}.log"
    env = {**environment(folder), faults.KILL_AT: point}
    dies_at(processes, processes.start(folder, [sys.executable, "-m", "stages", *target.argv], log, env), point, log)


def check_no_half_artifact(folder: Path, target: Target, reference: bytes) -> list[Path]:
    """The shard is absent or complete and identical, anything else beside it is a hidden temporary,
    and the run-record folder holds the record alone. Returns the temporaries."""
    out, record = folder / target.shard, folder / target.record
    temporaries = [p for p in out.parent.iterdir() if p.name != out.name] if out.parent.exists() else []
    assert all(TEMPORARY.fullmatch(p.name) for p in temporaries), temporaries
    if out.exists():
        assert out.read_bytes() == reference
    else:
        with pytest.raises(ArtifactError, match="artifact not found"):
            PerImageReader.sharded(out.parent, 1)  # the readers never take a temporary for the shard
    if record.parent.exists():
        assert [p.name for p in record.parent.iterdir()] in ([], [record.name])
    return temporaries


def kill_rerun_and_kill_again(processes: Processes, folder: Path, target: Target, kill: Kill,
                              reference: bytes) -> None:
    """Kill a first run at ``kill``, rerun to completion, then kill a rewrite at the same point."""
    out, record = folder / target.shard, folder / target.record
    # 1. Killed on a first run: nothing, or the complete shard, at the final path; no run record.
    killed_run(processes, folder, target, kill.point)
    temporaries = check_no_half_artifact(folder, target, reference)
    assert (out.exists(), bool(temporaries), record.exists()) == (kill.shard_in_place, kill.temporary, False)
    if kill == COMPLETE:  # a complete temporary, byte-identical even, is still not the artifact
        assert [p.read_bytes() == reference for p in temporaries] == [True]

    # 2. A rerun completes, gives the reference bytes, removes the killed run's temporaries, records the run.
    ok(stages_cli(folder, *target.argv))
    assert check_no_half_artifact(folder, target, reference) == [] and out.exists()
    assert json.loads(record.read_text())["images"] == IMAGES
    recorded = record.read_bytes()

    # 3. A rewrite killed at the same point leaves the previous artifact and its run record as they were.
    killed_run(processes, folder, target, kill.point)
    check_no_half_artifact(folder, target, reference)
    assert out.read_bytes() == reference and record.read_bytes() == recorded


@pytest.mark.slow
@pytest.mark.parametrize("kill", [STARTED, WRITING, COMPLETE, RENAMED], ids=str)
def test_killed_proposal_stage_leaves_no_half_artifact(crash_project, tmp_path, processes, kill):
    base, references = crash_project
    folder = tmp_path / "ws"
    shutil.copytree(base, folder, symlinks=True)
    kill_rerun_and_kill_again(processes, folder, PROPOSAL_TARGET, kill, references["proposals"])


# Kills before the rename are the shared writer's (stages.core.store, stages.core.atomic), covered at every point
# by the proposal stage's test; each run here starts PyTorch twice (stage and loader worker), so each feature
# stage gets the kill a user makes (mid-write), and features the one between its two writes.
@pytest.mark.slow
@pytest.mark.parametrize(("target", "kill"), [(FEATURES, WRITING), (FEATURES, RENAMED), (SPP_FEATURES, WRITING)],
                         ids=lambda v: getattr(v, "stage", str(v)))
def test_killed_feature_stage_leaves_no_half_artifact(feature_project, tmp_path, processes, target, kill):
    base, references = feature_project
    folder = tmp_path / "ws"
    shutil.copytree(base, folder, symlinks=True)
    kill_rerun_and_kill_again(processes, folder, target, kill, references[target.stage])


def test_the_next_write_removes_stale_temporaries_of_its_target_only(tmp_path: Path) -> None:
    stale = [tmp_path / ".out.h5.abcd_123.tmp.h5", tmp_path / ".out.h5.zz9zz9zz.tmp.h5"]
    kept = [
        tmp_path / ".other.h5.abcd_123.tmp.h5",  # another target's
        tmp_path / ".out.h5.x.abcd_123.tmp.h5",  # the target ".out.h5.x"'s
        tmp_path / "out.h5.bak",  # not a temporary
        tmp_path / ".out.h5.abcd_123.tmp",  # the suffix of another kind of write
    ]
    for path in stale + kept:
        path.write_text("left by a killed writer")
    with atomic_path(tmp_path / "out.h5", ".h5") as tmp:
        tmp.write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.h5", *(p.name for p in kept)])

    (tmp_path / ".data.abcdefgh.tmp").mkdir()  # a killed atomic_dir
    (tmp_path / ".data.abcdefgh.tmp" / "f").write_text("x")
    with atomic_dir(tmp_path / "data") as tmp:
        (tmp / "g").write_text("y")
    assert not (tmp_path / ".data.abcdefgh.tmp").exists()
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["g"]


# --- Luigi killed mid-run ----------------------------------------------------------------------

# One worker: Luigi runs the tasks in its own process, so a fault point kills the whole run.
LUIGI = luigi_command("--local-scheduler", workers=1)


def luigi_run(folder: Path) -> list[str]:
    """Run :data:`LUIGI` in ``folder`` to success; return the stage instances it ran."""
    result = run_to_end(LUIGI, folder, timeout=300)
    assert "This progress looks :)" in result.stdout + result.stderr, result.stdout + result.stderr
    return ran_instances(result.stdout + result.stderr)


def recorded(folder: Path) -> dict[str, dict]:
    """The stage instances ``dvc.lock`` records, with their entries."""
    lock = folder / "dvc.lock"
    return yaml.safe_load(lock.read_text())["stages"] if lock.exists() else {}


def output_files(folder: Path, entries: dict[str, dict]) -> dict[str, int]:
    """Modification time of every file of the outputs the lock ``entries`` record."""
    paths = [folder / out["path"] for entry in entries.values() for out in entry.get("outs", [])]
    files = [f for path in paths for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file()]
    return {str(f.relative_to(folder)): f.stat().st_mtime_ns for f in files}


@pytest.mark.slow
def test_killed_luigi_run_resumes_without_redoing_complete_tasks(tmp_path, processes):
    params = tiny_params()
    params["runtime"]["num_workers"] = 1
    every = ["synthetic", "index", "recall", *(f"proposals@{s}-{k}" for s in ("trainval", "test") for k in (0, 1))]
    reference, folder = project_copy(tmp_path / "reference", params), project_copy(tmp_path / "ws", params)
    assert sorted(luigi_run(reference)) == sorted(every)

    # The index writes both splits' images first; each proposal shard then holds 2 or 3 images, so the 4th
    # image of the proposal tasks is written by the second one.
    indexed = params["synthetic"]["num_trainval"] + params["synthetic"]["num_test"]
    point, log = f"image-written:{indexed + 4}", folder / "killed.log"
    dies_at(processes, processes.start(folder, LUIGI, log, {**environment(folder), faults.KILL_AT: point}), point,
            log)
    complete = recorded(folder)
    started = ran_instances(log.read_text())
    assert started[:2] == ["synthetic", "index"] and len(started) == 4, started
    assert sorted(complete) == sorted(started[:3])  # killed inside the second proposal task

    untouched = output_files(folder, complete)
    assert sorted(luigi_run(folder)) == sorted(set(every) - set(complete))
    assert {name: entry for name, entry in recorded(folder).items() if name in complete} == complete
    assert output_files(folder, complete) == untouched
    assert not [p for p in (folder / layout.CACHE).rglob(".*.tmp*")]  # the killed task's temporary is gone
    assert artifacts(folder) == artifacts(reference)


# --- full disk and unwritable output folder ----------------------------------------------------


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_is_a_clear_error_and_keeps_the_previous_artifact(workspace, monkeypatch, capsys):
    assert cli_main(PROPOSALS) == 0
    previous, record = SHARD.read_bytes(), RECORD.read_bytes()
    cfg = load_config()
    monkeypatch.setattr(h5py.Dataset, "__setitem__", _no_space)  # every write of image rows fails

    with pytest.raises(OutputError) as info:
        proposals.run(cfg.proposals, cfg.data.on_error, SPLIT, 0, cfg.sharding.num_shards, SHARD, 1)
    assert isinstance(info.value, PipelineError)
    assert str(SHARD) in str(info.value) and "No space left on device" in str(info.value)
    assert SHARD.read_bytes() == previous and RECORD.read_bytes() == record
    assert sorted(p.name for p in SHARD.parent.iterdir()) == [SHARD.name]

    capsys.readouterr()
    assert cli_main(PROPOSALS) == 1
    err = capsys.readouterr().err
    assert f"error: writing {SHARD} failed" in err and "No space left on device" in err
    assert "Traceback" not in err
    assert SHARD.read_bytes() == previous


@pytest.fixture
def tiny_tmpfs():
    """Mount a tmpfs at a given folder (root only); yields the mount function, unmounts at the end."""
    mounted: list[Path] = []

    def mount(folder: Path, size: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'}); "
                        "the simulated full disk is covered by the in-process test")
        mounted.append(folder)

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8); the in-process full-disk test covers the logic")
    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_real_full_disk_keeps_the_previous_artifact(workspace, tiny_tmpfs):
    ok(stages_cli(workspace, *PROPOSALS))
    previous = SHARD.read_bytes()
    folder = workspace / SHARD.parent
    saved = workspace / "saved"
    shutil.copytree(folder, saved)
    page = 4096
    tiny_tmpfs(folder, (len(previous) // page + 3) * page)  # room for the previous shard, not for a second one
    for path in saved.iterdir():
        shutil.copy(path, folder / path.name)

    failed = stages_cli(workspace, *PROPOSALS)
    assert failed.returncode != 0
    assert SHARD.read_bytes() == previous
    assert all(p.name == SHARD.name or TEMPORARY.fullmatch(p.name) for p in folder.iterdir())

    # With space again, a rerun succeeds and removes whatever temporary the failed run left.
    subprocess.run(["mount", "-o", "remount,size=16m", str(folder)], check=True)
    ok(stages_cli(workspace, *PROPOSALS))
    assert SHARD.read_bytes() == previous
    assert sorted(p.name for p in folder.iterdir()) == [SHARD.name]

    # The message itself. Known defect (h5py 3.16 / HDF5 2.0, sec2 driver): a write that
    # fails with ENOSPC leaves the file half-closed inside HDF5, which prints a traceback per
    # object it cannot close ("Exception ignored in h5py._objects.ObjectID.__dealloc__") and
    # crashes the interpreter (SIGSEGV) when it exits, after `error: ...` was printed.
    clean = failed.returncode == 1 and "Traceback" not in failed.stderr
    if not clean:
        pytest.xfail(f"HDF5 on a real full disk: exit status {failed.returncode}, error line "
                     f"{'printed' if f'error: writing {SHARD} failed' in failed.stderr else 'missing'}")
    assert f"error: writing {SHARD} failed" in failed.stderr and "No space left on device" in failed.stderr


def test_unwritable_output_folder_is_a_clear_error(workspace):
    assert cli_main(["proposals", "--split", "test", "--shard", "0"]) == 0  # a previous artifact elsewhere
    shutil.rmtree(SHARD.parent, ignore_errors=True)
    SHARD.parent.write_text("a regular file where the output folder should be")
    before = {p: p.read_bytes() for p in layout.CACHE.rglob("*") if p.is_file()}
    cfg = load_config()

    with pytest.raises(OutputError) as info:
        proposals.run(cfg.proposals, cfg.data.on_error, SPLIT, 0, cfg.sharding.num_shards, SHARD, 1)
    assert isinstance(info.value, PipelineError)
    assert str(SHARD.parent) in str(info.value)

    result = stages_cli(workspace, *PROPOSALS)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot create output folder {SHARD.parent}")
    assert "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in layout.CACHE.rglob("*") if p.is_file()} == before
