"""Named fault points, so that crash tests kill a stage exactly where they mean to, never after a guessed delay.

Stage code calls :func:`reached` at the points worth a crash test
(``reached("checkpoint-written")``). It does nothing unless the environment
variable ``STAGES_KILL_AT`` names that point: ``STAGES_KILL_AT=point`` kills the
process the first time it reaches ``point``, ``STAGES_KILL_AT=point:N`` the
``N``-th time this process reaches it (counted from the process start, over
every stage it runs). Point names hold no colon.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

KILL_AT = "STAGES_KILL_AT"

_times_reached: Counter[str] = Counter()


def reached(point: str) -> None:
    """Mark that this process has reached ``point``; SIGKILL it here if ``STAGES_KILL_AT`` says so.

    SIGKILL, not an exception or ``sys.exit``: nothing gets to clean up, flush
    or close, as when the machine loses power or the kernel kills the process
    for memory.
    """
    target = os.environ.get(KILL_AT)
    if not target:
        return
    name, _, nth = target.partition(":")
    if name != point:
        return
    _times_reached[point] += 1
    if _times_reached[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
