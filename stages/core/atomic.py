"""Atomic writes: an artifact either exists complete or does not exist at all.

Every output is written under a temporary name in the same folder and renamed
into place only when complete, so a killed process, a full disk or an
exception never leaves a half-written file that looks finished. A process
killed outright (SIGKILL, power loss) cannot remove its temporary
(``.<name>.XXXXXXXX.tmp<suffix>``, hidden, never read as the artifact); the next
write of the same target removes it. Two concurrent writers of one target are
not supported (the orchestrators never run one stage twice at once).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from stages.core import faults
from stages.core.errors import PipelineError


class OutputError(PipelineError, OSError):
    """An output folder cannot be created or written."""


def _prepare_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {path.parent}: {exc.strerror}") from exc
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"output folder {path.parent} is not writable")


def _remove_stale(path: Path, suffix: str) -> None:
    """Remove temporaries of ``path`` left by a writer that was killed (``mkstemp``/``mkdtemp`` names)."""
    stale = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp{re.escape(suffix)}")
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        for entry in [e for e in entries if stale.fullmatch(e.name)]:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; rename it to ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left as it was. Crash tests
    kill the process at the fault points (:mod:`stages.core.faults`) ``temporary-complete`` (the
    temporary is written, closed and verified; the rename is next) and ``renamed`` (it is in place).
    """
    path = Path(path)
    _prepare_parent(path)
    _remove_stale(path, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        faults.reached("temporary-complete")
        os.replace(tmp_path, path)
        faults.reached("renamed")
    except OSError as exc:
        if isinstance(exc, PipelineError):
            raise
        raise OutputError(f"writing {path} failed ({exc}); any previous {path.name} is left intact") from exc
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; it replaces ``path`` on success."""
    path = Path(path)
    _prepare_parent(path)
    _remove_stale(path, "")
    tmp_path = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o755)
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp_path, path)
        except OSError:
            if old.exists():
                os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        if isinstance(exc, PipelineError):
            raise
        raise OutputError(f"writing {path} failed ({exc}); any previous {path.name} is left intact") from exc
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    """Write a small text artifact (JSON metrics, CSV plots) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
