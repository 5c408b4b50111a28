"""Crash safety: a killed, out-of-space or unwritable run never leaves a half-written artifact.

- The proposal stage (``python -m stages proposals``) is killed with SIGKILL at several
  points: after fixed delays, while it appends images to its temporary file, with the
  temporary complete but not yet renamed, and with the shard renamed but its timing file
  not yet written. After each kill the final path holds nothing or a complete file
  byte-identical to an uninterrupted run, no temporary is read as the artifact, a rerun
  completes (and removes the killed run's temporaries), and a killed *rewrite* leaves the
  previous artifact as it was.
- The feature stages (``features``, ``spp_features``) are killed the same way while they
  append images (and ``features`` with the shard renamed but its timing file not yet
  written); the same checks hold.
- ``luigi ... Recall --local-scheduler`` (the data and sharded proposal stages) is killed
  mid-run; the rerun runs exactly the tasks that had not completed (stamps and outputs of
  the others untouched) and the artifacts equal a clean run's.
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import pytest

import pipeline
from stages.core import layout
from stages import proposals
from stages.__main__ import main as cli_main
from stages.core.atomic import OutputError, atomic_dir, atomic_path
from stages.core.config import load_config
from stages.core.errors import PipelineError
from stages.core.store import ArtifactError, PerImageReader

from conftest import tiny_params
from test_pipeline import artifacts, project_copy

BIN = Path(sys.executable).parent
SPLIT = "trainval"
SHARD = layout.proposals_shard(SPLIT, 0)
TIMING = layout.timing_file(SHARD)
# A temporary of the shard or of its timing file (stages.core.atomic: mkstemp next to the target).
TEMPORARY = re.compile(r"\.shard-0\.(h5\.[a-z0-9_]{8}\.tmp\.h5|timing\.json\.[a-z0-9_]{8}\.tmp)")
IMAGES = 60


def crash_params() -> dict:
    """Many tiny images in one shard and one worker process: a run lasts a few seconds."""
    params = tiny_params()
    params["synthetic"].update(num_trainval=IMAGES, num_test=4, min_side=64, max_side=96)
    params["proposals"]["max_side"] = 96
    params["sharding"]["shards"] = [0]
    params["runtime"]["num_workers"] = 1
    return params


def environment(folder: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(folder)}


def stages_cli(folder: Path, *args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = environment(pythonpath or folder)
    return subprocess.run(
        [sys.executable, "-m", "stages", *args], cwd=folder, env=env, capture_output=True, text=True, timeout=300
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args} failed:\n{result.stdout}\n{result.stderr}"
    return result


class Processes:
    """Subprocesses of one test, each in its own session so that its whole group can be killed."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, folder: Path, args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Run ``args`` in ``folder`` (PYTHONPATH too, unless ``env`` is given), output to ``log``."""
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                args, cwd=folder, env=env or environment(folder), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append(proc)
        return proc

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL the process and everything it started (its pool workers, Luigi's task processes)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=30)

    def close(self) -> None:
        for proc in self.started:
            self.kill(proc)


@pytest.fixture
def processes():
    started = Processes()
    yield started
    started.close()


def wait_for(condition: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (status {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@dataclass(frozen=True)
class Target:
    """A sharded stage run on shard 0 of the training split, and the file it writes."""

    stage: str  # the command and the module of stages/ (whose write_text writes the timing file)
    shard: Path

    @property
    def argv(self) -> list[str]:
        return [self.stage, "--split", SPLIT, "--shard", "0"]

    @property
    def timing(self) -> Path:
        return layout.timing_file(self.shard)


PROPOSAL_TARGET = Target("proposals", SHARD)
PROPOSALS = PROPOSAL_TARGET.argv
FEATURE_TARGETS = [Target("features", layout.features_shard("rcnn", SPLIT, 0)),
                   Target("spp_features", layout.spp_shard(SPLIT, 0))]


def progress(log: Path, total: int) -> int:
    """Units (images or regions) done so far, from the stage's tqdm progress bar."""
    done = re.findall(rf"\| *(\d+)/{total} \[", log.read_text(errors="replace")) if log.exists() else []
    return max(map(int, done), default=0)


# --- sharded stages killed ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def crash_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A project copy with the dataset generated and indexed, and the shard of an uninterrupted run."""
    root = tmp_path_factory.mktemp("crash")
    base = project_copy(root / "base", crash_params())
    ok(stages_cli(base, "synthetic"))
    ok(stages_cli(base, "index"))
    reference = root / "reference"
    shutil.copytree(base, reference, symlinks=True)
    ok(stages_cli(reference, *PROPOSALS))
    return base, (reference / SHARD).read_bytes()


@pytest.fixture(scope="module")
def feature_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes], dict[str, int]]:
    """A project with proposals (ten per image) and, per feature stage, the shard of an uninterrupted run
    and its progress-bar total. ImageNet features: no fine-tuning needed."""
    params = crash_params()
    params["proposals"]["max_boxes"] = 10
    params["features"]["model"] = "imagenet"
    root = tmp_path_factory.mktemp("crash-features")
    base = project_copy(root / "base", params)
    for argv in (["synthetic"], ["index"], PROPOSALS):
        ok(stages_cli(base, *argv))
    reference = root / "reference"
    shutil.copytree(base, reference, symlinks=True)
    shards, totals = {}, {}
    for target in FEATURE_TARGETS:
        ok(stages_cli(reference, *target.argv))
        shards[target.stage] = (reference / target.shard).read_bytes()
        timing = json.loads((reference / target.timing).read_text())
        totals[target.stage] = timing["regions"] if target.stage == "features" else timing["images"]
    return base, shards, totals


# Kill points where the process kills itself: deterministic moments inside the write.
_SELF_KILL = """
import importlib, os, signal
from stages.__main__ import main
module = importlib.import_module({module!r})
real = getattr(module, {name!r})
def die(*args, **kwargs):
    if {call_real}:
        real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(module, {name!r}, die)
main({argv!r})
"""
SELF_KILL = {
    # the temporary is complete, closed and verified; the rename is next
    "complete-not-renamed": ("stages.core.store", "_verify", True),
    # the shard is in place; its timing file is next (None: the target stage's module)
    "renamed-no-timing": (None, "write_text", False),
}
KILL_POINTS = [0.3, 1.0, 2.0, "mid-write", *SELF_KILL]


def killed_run(processes: Processes, folder: Path, target: Target, point: float | str, total: int) -> subprocess.Popen:
    """Start the stage and SIGKILL it at ``point`` (``mid-write``: a third of ``total`` done)."""
    log = folder / f"kill-{target.stage}-{point}.log"
    if point in SELF_KILL:
        module, name, call_real = SELF_KILL[point]
        code = _SELF_KILL.format(module=module or f"stages.{target.stage}", name=name, call_real=call_real,
                                 argv=target.argv)
        args = [sys.executable, "-c", code]
    else:
        args = [sys.executable, "-m", "stages", *target.argv]
    proc = processes.start(folder, args, log)
    try:
        if isinstance(point, float):
            time.sleep(point)
        elif point == "mid-write":
            wait_for(lambda: progress(log, total) >= total // 3, 120, f"a third of {target.stage}'s work", proc)
            assert progress(log, total) < total
        else:
            proc.wait(timeout=120)
            assert proc.returncode == -signal.SIGKILL, log.read_text(errors="replace")
    finally:
        processes.kill(proc)
    return proc


def check_no_half_artifact(folder: Path, target: Target, reference: bytes) -> list[Path]:
    """The shard is absent or complete and identical; anything else is a hidden temporary. Returns those."""
    out = folder / target.shard
    temporaries = []
    for path in out.parent.iterdir() if out.parent.exists() else []:
        if path.name not in (out.name, target.timing.name):
            assert TEMPORARY.fullmatch(path.name), f"unexpected file {path.name}"
            temporaries.append(path)
    if out.exists():
        assert out.read_bytes() == reference
    else:
        with pytest.raises(ArtifactError, match="artifact not found"):
            PerImageReader.sharded(out.parent, 1)  # the readers never take a temporary for the shard
    if (folder / target.timing).exists():
        assert json.loads((folder / target.timing).read_text())["images"] == IMAGES
    return temporaries


def kill_rerun_and_kill_again(processes: Processes, folder: Path, target: Target, point: float | str,
                              reference: bytes, total: int) -> None:
    """Kill a first run at ``point``, rerun to completion, then kill a rewrite at the same point."""
    out = folder / target.shard
    # 1. Killed on a first run: nothing, or the complete shard, at the final path.
    proc = killed_run(processes, folder, target, point, total)
    temporaries = check_no_half_artifact(folder, target, reference)
    if point == "mid-write":
        assert proc.returncode == -signal.SIGKILL
        assert not out.exists() and any(p.name.endswith(".tmp.h5") for p in temporaries)
    if point == "complete-not-renamed":
        # A temporary that is complete (byte-identical, even) is still not the artifact.
        assert not out.exists()
        assert [p.read_bytes() == reference for p in temporaries if p.name.endswith(".tmp.h5")] == [True]
    if point == "renamed-no-timing":
        assert out.exists() and not (folder / target.timing).exists()
        with PerImageReader.sharded(out.parent, 1) as reader:
            assert len(reader) == IMAGES
    # (after a fixed delay the run may also have finished on a fast machine: the checks hold all the same)

    # 2. A rerun completes, gives the reference bytes and removes the killed run's temporaries.
    ok(stages_cli(folder, *target.argv))
    assert out.read_bytes() == reference
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, target.timing.name]

    # 3. A rewrite killed at the same point leaves the previous artifact as it was.
    killed_run(processes, folder, target, point, total)
    check_no_half_artifact(folder, target, reference)
    assert out.read_bytes() == reference


@pytest.mark.parametrize("point", KILL_POINTS, ids=str)
def test_killed_proposal_stage_leaves_no_half_artifact(crash_project, tmp_path, processes, point):
    base, reference = crash_project
    folder = tmp_path / "ws"
    shutil.copytree(base, folder, symlinks=True)
    kill_rerun_and_kill_again(processes, folder, PROPOSAL_TARGET, point, reference, IMAGES)


# "complete-not-renamed" is the shared writer's (stages.core.store), covered by the proposal stage's test;
# each run here starts PyTorch twice (stage and loader worker), so SPP-net gets the one kill a user makes.
FEATURE_KILLS = [(FEATURE_TARGETS[0], "mid-write"), (FEATURE_TARGETS[0], "renamed-no-timing"),
                 (FEATURE_TARGETS[1], "mid-write")]


@pytest.mark.parametrize(("target", "point"), FEATURE_KILLS, ids=lambda v: getattr(v, "stage", v))
def test_killed_feature_stage_leaves_no_half_artifact(feature_project, tmp_path, processes, target, point):
    base, references, totals = feature_project
    folder = tmp_path / "ws"
    shutil.copytree(base, folder, symlinks=True)
    kill_rerun_and_kill_again(processes, folder, target, point, references[target.stage], totals[target.stage])


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


def luigi_command(*extra: str) -> list[str]:
    # --no-lock: Luigi's default lock is per command line and machine, so an identical
    # command in another project folder (another test run) would make this one a no-op.
    return [str(BIN / "luigi"), "--module", "pipeline", "Recall", "--workers", "2", "--no-lock", *extra]


TASK_LINE = re.compile(r"\b(running|done|failed) {2,}(\w+\([^()\n]*\))")


def task_events(log: str) -> list[tuple[str, str]]:
    """``(event, task)`` for every task a Luigi worker started (running), finished (done) or failed."""
    return TASK_LINE.findall(log)


def all_stage_tasks() -> dict[str, pipeline.StageTask]:
    """Every stage task of the tiny project by its Luigi repr (what the worker logs print)."""
    params = tiny_params()
    tasks = [pipeline.Synthetic(), pipeline.Index(), pipeline.Recall()]
    tasks += [pipeline.Proposals(split=s, shard=k) for s in ("trainval", "test") for k in params["sharding"]["shards"]]
    return {str(task): task for task in tasks}


def owner(path: Path) -> str:
    """The Luigi task (repr) that writes ``path``, relative to features_cache."""
    parts = path.parts
    if parts[0] == "proposals":
        return f"Proposals(split={parts[1]}, shard={parts[2].split('.')[0].split('-')[1]})"
    return {"synthetic": "Synthetic()", "index": "Index()", "reports": "Recall()"}[parts[0]]


def snapshot(folder: Path) -> dict[str, int]:
    """Modification times of every file under features_cache but temporaries (hidden files)."""
    cache = folder / layout.CACHE
    return {
        str(p.relative_to(cache)): p.stat().st_mtime_ns
        for p in cache.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


def test_killed_luigi_run_resumes_without_redoing_complete_tasks(tmp_path, processes):
    params = tiny_params()
    params["runtime"]["num_workers"] = 1
    reference, folder = project_copy(tmp_path / "reference", params), project_copy(tmp_path / "ws", params)
    clean = subprocess.run(luigi_command("--local-scheduler"), cwd=reference, env=environment(reference),
                           capture_output=True, text=True, timeout=300)
    assert "This progress looks :)" in clean.stdout + clean.stderr, clean.stderr

    stamps = folder / pipeline.STAMPS
    proc = processes.start(folder, luigi_command("--local-scheduler"), folder / "killed.log")
    try:
        wait_for(lambda: stamps.is_dir() and any(stamps.glob("Proposals_*.sig")), 120, "a first Proposals task", proc)
    finally:
        processes.kill(proc)
    tasks = all_stage_tasks()
    complete = {name for name, task in tasks.items() if (stamps / f"{task.task_id}.sig").is_file()}
    assert {"Synthetic()", "Index()"} <= complete and "Recall()" not in complete, complete  # killed mid-run
    before = snapshot(folder)

    rerun = subprocess.run(luigi_command("--local-scheduler"), cwd=folder, env=environment(folder),
                           capture_output=True, text=True, timeout=300)
    log = rerun.stdout + rerun.stderr
    assert "This progress looks :)" in log, log
    ran = [task for event, task in task_events(log) if event == "running" and task in tasks]
    assert sorted(ran) == sorted(set(tasks) - complete)  # each incomplete task once, no complete one
    after = snapshot(folder)
    for name, mtime in before.items():
        task = ".luigi" if name.startswith(".luigi/") else owner(Path(name))
        if task == ".luigi":
            stamp_task = next((t for t, v in tasks.items() if f"{v.task_id}.sig" == Path(name).name), None)
            if stamp_task in complete:
                assert after[name] == mtime, f"stamp of complete task {stamp_task} rewritten"
        elif task in complete:
            assert after[name] == mtime, f"{name} of complete task {task} rewritten"
    assert artifacts(folder) == artifacts(reference)


# --- full disk and unwritable output folder ----------------------------------------------------


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_is_a_clear_error_and_keeps_the_previous_artifact(workspace, monkeypatch, capsys):
    assert cli_main(PROPOSALS) == 0
    previous = SHARD.read_bytes()
    cfg = load_config()
    monkeypatch.setattr(h5py.Dataset, "__setitem__", _no_space)  # every write of image rows fails

    with pytest.raises(OutputError) as info:
        proposals.run(cfg.proposals, cfg.data.on_error, SPLIT, 0, cfg.sharding.num_shards, SHARD, 1)
    assert isinstance(info.value, PipelineError)
    assert str(SHARD) in str(info.value) and "No space left on device" in str(info.value)
    assert SHARD.read_bytes() == previous
    assert sorted(p.name for p in SHARD.parent.iterdir()) == [SHARD.name, TIMING.name]

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
    from conftest import REPO

    ok(stages_cli(workspace, *PROPOSALS, pythonpath=REPO))
    previous = SHARD.read_bytes()
    folder = workspace / SHARD.parent
    saved = workspace / "saved"
    shutil.copytree(folder, saved)
    page = 4096
    tiny_tmpfs(folder, (len(previous) // page + 3) * page)  # room for the previous shard, not for a second one
    for path in saved.iterdir():
        shutil.copy(path, folder / path.name)

    failed = stages_cli(workspace, *PROPOSALS, pythonpath=REPO)
    assert failed.returncode != 0
    assert SHARD.read_bytes() == previous
    assert all(p.name in (SHARD.name, TIMING.name) or TEMPORARY.fullmatch(p.name) for p in folder.iterdir())

    # With space again, a rerun succeeds and removes whatever temporary the failed run left.
    subprocess.run(["mount", "-o", "remount,size=16m", str(folder)], check=True)
    ok(stages_cli(workspace, *PROPOSALS, pythonpath=REPO))
    assert SHARD.read_bytes() == previous
    assert sorted(p.name for p in folder.iterdir()) == [SHARD.name, TIMING.name]

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
    from conftest import REPO

    assert cli_main(["proposals", "--split", "test", "--shard", "0"]) == 0  # a previous artifact elsewhere
    shutil.rmtree(SHARD.parent, ignore_errors=True)
    SHARD.parent.write_text("a regular file where the output folder should be")
    before = {p: p.read_bytes() for p in layout.CACHE.rglob("*") if p.is_file()}
    cfg = load_config()

    with pytest.raises(OutputError) as info:
        proposals.run(cfg.proposals, cfg.data.on_error, SPLIT, 0, cfg.sharding.num_shards, SHARD, 1)
    assert isinstance(info.value, PipelineError)
    assert str(SHARD.parent) in str(info.value)

    result = stages_cli(workspace, *PROPOSALS, pythonpath=REPO)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot create output folder {SHARD.parent}")
    assert "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in layout.CACHE.rglob("*") if p.is_file()} == before
