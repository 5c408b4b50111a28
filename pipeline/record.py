"""``dvc.lock``: the one record of completed work, read and written by both orchestrators.

``dvc repro`` records each stage it runs in ``dvc.lock`` (hashes of its
command, params, dependencies and outputs). A Luigi task asks the same
record whether its stage instance is current (DVC's own status check: a
changed parameter, code file or input, or an output whose content no longer
matches, makes it stale) and, after running the stage, records it there with
``dvc commit``. So whichever orchestrator ran last, the other sees its work.

Several Luigi worker processes may share one repository: every read and
write of the record takes an exclusive ``flock`` first (DVC's own lock does
not wait), and a process reloads the record whenever ``dvc.lock`` changed,
and after a fork (Luigi runs tasks in forked processes with ``--workers N``).
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from stages.core.errors import PipelineError

LOCK_FILE = Path(".dvc") / "tmp" / "pipeline-record.lock"


class RecordError(PipelineError):
    """The DVC record cannot be read or written (no DVC repository here, or a stage it does not know)."""


class DvcRecord:
    """The DVC repository of the working directory, loaded once and reloaded when ``dvc.lock`` changes."""

    def __init__(self, root: Path = Path(".")) -> None:
        self.root = root
        self._repo = None
        self._stages: dict[str, object] = {}  # DVC drops its index after every lock: keep the stages
        self._loaded_from: tuple[int, int] | None = None  # dvc.lock's mtime and size when loaded
        self._pid = os.getpid()  # the process that loaded it

    def is_current(self, address: str) -> bool:
        """True when the stage instance's outputs are what its current command, params and inputs give."""
        with self._locked():
            return not self._stage(address).changed()

    def commit(self, address: str) -> None:
        """Record the stage instance's outputs in ``dvc.lock`` and DVC's cache, as ``dvc repro`` would."""
        with self._locked() as repo:
            repo.commit(f"{self.root / 'dvc.yaml'}:{address}", force=True)
        self._loaded_from = None  # our own write: reload before the next read

    @contextmanager
    def _locked(self) -> Iterator[object]:
        from dvc.repo import lock_repo

        path = self.root / LOCK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            repo = self._current_repo()
            with lock_repo(repo):
                yield repo

    def _current_repo(self):
        stamp, forked = self._lock_stamp(), self._pid != os.getpid()
        if self._repo is None or forked or stamp != self._loaded_from:
            from dvc.repo import Repo

            if self._repo is not None and not forked:
                self._repo.close()  # a forked Luigi task process never touches its parent's databases
            try:
                self._repo = Repo(str(self.root))
            except Exception as exc:  # dvc raises NotDvcRepoError and friends
                raise RecordError(f"{self.root.resolve()}: not a DVC repository ({exc})") from None
            self._stages = {stage.name: stage for stage in self._repo.index.stages}
            self._loaded_from, self._pid = stamp, os.getpid()
        return self._repo

    def _lock_stamp(self) -> tuple[int, int]:
        try:
            info = os.stat(self.root / "dvc.lock")
        except FileNotFoundError:
            return (0, 0)
        return (info.st_mtime_ns, info.st_size)

    def _stage(self, address: str):
        if address not in self._stages:
            raise RecordError(f"dvc.yaml has no stage {address!r}: regenerate it (make dvc.yaml)")
        return self._stages[address]
