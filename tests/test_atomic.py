"""Atomic writes: an output exists complete or not at all, and a failure keeps the previous one."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from stages.core.atomic import OutputError, atomic_dir, atomic_path, write_text
from stages.core.errors import PipelineError


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_path_renames_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with atomic_path(target, ".txt") as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".out.txt.") and tmp.name.endswith(".tmp.txt")
        assert not target.exists()  # nothing visible until the block completes
        tmp.write_text("done")
    assert target.read_text() == "done"
    assert target.stat().st_mode & 0o777 == 0o644
    assert _names(tmp_path) == ["out.txt"]


def test_atomic_path_creates_parent_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.txt"
    write_text(target, "x")
    assert target.read_text() == "x"


def test_atomic_path_exception_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert _names(tmp_path) == []


def test_atomic_path_exception_keeps_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["out.txt"]


def test_os_error_inside_becomes_output_error(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    write_text(target, "old")
    with pytest.raises(OutputError) as info:
        with atomic_path(target):
            raise OSError(28, "No space left on device")
    assert f"writing {target} failed" in str(info.value)
    assert "any previous out.txt is left intact" in str(info.value)
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["out.txt"]


def test_pipeline_errors_pass_through_unchanged(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="^inner$"):
        with atomic_path(tmp_path / "out.txt"):
            raise OutputError("inner")


def test_write_text_twice_is_byte_identical(tmp_path: Path) -> None:
    write_text(tmp_path / "a.json", '{"x": 1}\n')
    write_text(tmp_path / "b.json", '{"x": 1}\n')
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes() == b'{"x": 1}\n'


def test_write_text_replaces(tmp_path: Path) -> None:
    write_text(tmp_path / "a.txt", "one")
    write_text(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "two"
    assert _names(tmp_path) == ["a.txt"]


def test_parent_is_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(OutputError) as info:
        write_text(tmp_path / "afile" / "out.h5", "x")
    assert str(info.value).startswith(f"cannot create output folder {tmp_path / 'afile'}")
    assert isinstance(info.value, PipelineError)
    with pytest.raises(OutputError, match="cannot create output folder"):
        with atomic_dir(tmp_path / "afile" / "sub" / "folder"):
            pass


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod 0o500 does not stop root from writing")
def test_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError, match=f"output folder {folder} is not writable"):
            write_text(folder / "out.txt", "x")
    finally:
        folder.chmod(0o700)


def test_atomic_dir_replaces_folder_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.")
        assert _names(tmp) == []
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").exists()  # still the old folder while writing
    assert _names(target) == ["new.txt"]
    assert (target / "new.txt").read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o755
    assert _names(tmp_path) == ["out"]  # no temporary or .old folder left


def test_atomic_dir_creates_new_folder(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "fresh") as tmp:
        (tmp / "f").write_text("1")
    assert _names(tmp_path / "fresh") == ["f"]
    assert _names(tmp_path) == ["fresh"]


def test_atomic_dir_failure_keeps_previous_folder(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert _names(target) == ["old.txt"]
    assert (target / "old.txt").read_text() == "old"
    assert _names(tmp_path) == ["out"]


def test_atomic_dir_failure_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out"):
            raise RuntimeError("boom")
    assert _names(tmp_path) == []
