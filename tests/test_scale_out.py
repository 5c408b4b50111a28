"""Scale-out: several Luigi processes share one pipeline through a central scheduler (luigid).

A ``luigid`` on 127.0.0.1 (a free port, state in a temporary folder) coordinates
``luigi --module pipeline Recall --workers 2`` processes (the sharded proposal stages) working in one project copy
with 4 proposal shards per split:

- two processes started together compute every task exactly once between them, both
  take part, and the artifacts are byte-identical to a single ``--local-scheduler`` run;
- a process SIGKILLed (with its task processes) while it computes a shard leaves that
  shard to a process started afterwards, which redoes exactly the unfinished tasks.

The scheduler settings that make a dead worker's task available again within seconds
(instead of after the defaults' 60 s + 15 min) are test-only and reach luigid and the
workers through ``LUIGI_CONFIG_PATH`` (see ``SCHEDULER_CONFIG``).
"""
from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from helpers import (
    BIN,
    Processes,
    artifacts,
    environment,
    luigi_command,
    project_copy,
    task_events,
    tiny_params,
    wait_for,
)

import pipeline
from pipeline.record import DvcRecord
from stages.core import layout

pytestmark = pytest.mark.slow

SHARDS = [0, 1, 2, 3]

# Test-only settings. luigid: forget a worker 3 s after its last ping (default 60 s), and
# check for such workers whenever a worker asks for work (default: once a minute); the
# dead worker's running task is then FAILED and PENDING again 1 s later (default 15 min)
# for a live worker to take; a task failing 3 times is disabled so that nothing retries
# forever. Workers: ping every 0.5 s, and keep_alive so that a process whose remaining
# tasks are running elsewhere waits for them (and takes them over if their worker dies)
# instead of quitting; poll for work every 0.5-0.7 s (default 1-6 s).
SCHEDULER_CONFIG = """\
[scheduler]
worker_disconnect_delay = 3
prune_on_get_work = true
retry_delay = 1
retry_count = 3

[worker]
keep_alive = true
ping_interval = 0.5
wait_interval = 0.5
wait_jitter = 0.2
"""


def scale_params() -> dict:
    params = tiny_params()
    params["synthetic"].update(num_trainval=16, num_test=8)
    params["sharding"]["shards"] = SHARDS
    params["runtime"]["num_workers"] = 1
    return params


def stage_tasks() -> dict[str, pipeline.StageTask]:
    """Every stage task of the project by the name Luigi's worker logs give it."""
    tasks = [pipeline.Synthetic(), pipeline.Index(), pipeline.Recall()]
    tasks += [pipeline.Proposals(split=s, shard=k) for s in ("trainval", "test") for k in SHARDS]
    return {str(t): t for t in tasks}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scheduler:
    def __init__(self, port: int, config: Path, log: Path):
        self.port, self.config, self.log = port, config, log

    def env(self, folder: Path) -> dict[str, str]:
        return {**environment(folder), "LUIGI_CONFIG_PATH": str(self.config)}

    def command(self) -> list[str]:
        return luigi_command("--scheduler-host", "127.0.0.1", "--scheduler-port", str(self.port))


@pytest.fixture
def luigid(tmp_path: Path):
    """A fresh central scheduler per test (task ids do not depend on the project folder)."""
    folder = tmp_path / "luigid"
    folder.mkdir()
    config = folder / "scheduler.cfg"
    config.write_text(SCHEDULER_CONFIG)
    port = free_port()
    command = [str(BIN / "luigid"), "--address", "127.0.0.1", "--port", str(port),
               "--state-path", str(folder / "state.pickle"), "--logdir", str(folder)]
    with open(folder / "stdout.log", "wb") as out:
        proc = subprocess.Popen(command, cwd=folder, env={**os.environ, "LUIGI_CONFIG_PATH": str(config)},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 60, f"luigid to listen on 127.0.0.1:{port}", proc)
        yield Scheduler(port, config, folder / "luigi-server.log")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The artifacts of one ``--local-scheduler`` process."""
    folder = project_copy(tmp_path_factory.mktemp("scale") / "reference", scale_params())
    result = subprocess.run(luigi_command("--local-scheduler"), cwd=folder, env=environment(folder),
                            capture_output=True, text=True, timeout=300)
    assert "This progress looks :)" in result.stdout + result.stderr, result.stderr
    return artifacts(folder)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"luigi did not finish in {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")
    text = log.read_text(errors="replace")
    # A process that waited for tasks another one ran ends with "This progress looks :|":
    # Luigi's summary only knows what it saw when scheduling. Failures are what matter.
    assert proc.returncode == 0 and "This progress looks :(" not in text, text[-3000:]
    assert "Execution Summary" in text and not [t for e, t in task_events(text) if e == "failed"], text[-3000:]
    return text


def events(log: str, event: str) -> list[str]:
    tasks = stage_tasks()
    return [task for e, task in task_events(log) if e == event and task in tasks]


def test_two_worker_processes_compute_each_task_once(luigid, reference, tmp_path, processes):
    folder = project_copy(tmp_path / "ws", scale_params())
    logs = [folder / f"luigi-{i}.log" for i in range(2)]
    started = [processes.start(folder, luigid.command(), log, luigid.env(folder)) for log in logs]
    texts = [finish(proc, log) for proc, log in zip(started, logs)]

    running = collections.Counter(task for text in texts for task in events(text, "running"))
    done = collections.Counter(task for text in texts for task in events(text, "done"))
    once = collections.Counter(list(stage_tasks()))
    assert running == once, running  # every task started exactly once across both processes ...
    assert done == once, done  # ... and finished there
    for text in texts:  # both processes computed shards
        assert any(task.startswith("Proposals(") for task in events(text, "done")), text[-3000:]
    assert artifacts(folder) == reference


def test_a_killed_worker_process_leaves_its_shard_to_another(luigid, reference, tmp_path, processes):
    folder = project_copy(tmp_path / "ws", scale_params())

    def writing_a_shard() -> bool:
        return any((folder / layout.PROPOSALS).glob("*/.shard-*.h5.*.tmp.h5"))

    first_log = folder / "luigi-killed.log"
    first = processes.start(folder, luigid.command(), first_log, luigid.env(folder))
    try:
        wait_for(writing_a_shard, 120, "the first process to be writing a shard", first)
    finally:
        Processes.kill(first)  # the process and its task processes, mid-shard
    first_text = first_log.read_text(errors="replace")
    tasks = stage_tasks()
    record = DvcRecord(folder)
    complete = {name for name, task in tasks.items() if record.is_current(task.address)}
    interrupted = set(events(first_text, "running")) - complete
    assert any(t.startswith("Proposals(") for t in interrupted), f"no shard was being computed:\n{first_text[-3000:]}"
    assert "Recall()" not in complete

    second_log = folder / "luigi-second.log"
    second_text = finish(processes.start(folder, luigid.command(), second_log, luigid.env(folder)), second_log)
    second_ran = collections.Counter(events(second_text, "running"))
    assert interrupted <= set(second_ran)  # the killed process's shards were redone by the other ...
    assert second_ran == collections.Counter(set(tasks) - complete)  # ... with every unfinished task, once
    server_log = luigid.log.read_text(errors="replace")
    for name in interrupted:  # released because luigid saw the worker go silent, not by chance
        assert f"Task '{tasks[name].task_id}' is marked as running by disconnected worker" in server_log
    assert artifacts(folder) == reference
