"""Named fault points: ``reached`` SIGKILLs its process exactly where ``STAGES_KILL_AT`` says, and nowhere else."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from stages.core.faults import KILL_AT

# reaches point "a" five times, printing 0..4 after each, and "b" in between
SCRIPT = """
from stages.core.faults import reached
for i in range(5):
    reached("b")
    reached("a")
    print(i, flush=True)
"""


def reach(kill_at: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != KILL_AT}
    if kill_at is not None:
        env[KILL_AT] = kill_at
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("kill_at", "printed"), [("a", ""), ("a:3", "0\n1\n"), ("b:2", "0\n")])
def test_killed_at_the_named_point_and_time(kill_at, printed):
    result = reach(kill_at)
    assert result.returncode == -signal.SIGKILL and result.stdout == printed


@pytest.mark.parametrize("kill_at", [None, "", "c", "a:6"])
def test_runs_through_when_no_point_or_time_matches(kill_at):
    result = reach(kill_at)
    assert result.returncode == 0 and result.stdout == "0\n1\n2\n3\n4\n"
