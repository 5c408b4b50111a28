"""Provenance: a stage's code files, their version, and input digests."""
from __future__ import annotations

import ast
import hashlib
import re
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from stages.core import provenance
from stages.core.provenance import code_files, code_version, file_digest, files_digest
from stages.table import TABLE


@pytest.fixture()
def package_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``stages`` copied to a temporary folder that provenance reads instead of the real one."""
    copy = tmp_path / "stages"
    shutil.copytree(provenance.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "PACKAGE_DIR", copy)
    code_files.cache_clear()
    yield copy
    code_files.cache_clear()  # monkeypatch restores PACKAGE_DIR; the cache must forget the copy too


def _names(module: str) -> list[str]:
    """Code files of a module as paths below the package."""
    return [p.relative_to(provenance.PACKAGE_DIR).as_posix() for p in code_files(module)]


def test_code_files_of_index() -> None:
    names = _names("index")
    for expected in ("index.py", "data/voc.py", "core/store.py", "core/atomic.py", "data/images.py", "ops/boxes.py",
                     "core/config.py"):
        assert expected in names
    assert "proposals.py" not in names
    assert "recall.py" not in names
    assert names == sorted(names)


def test_code_files_exact_small_cases() -> None:
    assert _names("ops.boxes") == ["ops/boxes.py"]  # torch is imported lazily
    assert _names("core.errors") == ["core/errors.py"]
    assert _names("data.images") == ["core/errors.py", "data/images.py"]
    assert _names("core.store") == ["core/atomic.py", "core/errors.py", "core/faults.py", "core/store.py"]


def test_package_markers_hold_no_code_of_a_result() -> None:
    """Code versions leave ``__init__.py`` out, which is only right while they compute nothing: the subpackages'
    are empty, the package's only pins the CPU kernels (``core/kernels.py``, every stage's code dependency) and
    sets the allocator (``core/memory.py``, which changes no arithmetic and is in no stage's code files)."""
    top = provenance.PACKAGE_DIR / "__init__.py"
    markers = [p for p in provenance.PACKAGE_DIR.rglob("__init__.py") if p != top]
    assert len(markers) >= 5
    assert all(p.read_text() == "" for p in markers)
    statements = [ast.unparse(node) for node in ast.parse(top.read_text()).body[1:]]  # after the docstring
    assert statements == ["from stages.core.kernels import pin_cpu_kernels",
                          "from stages.core.memory import keep_freed_memory", "pin_cpu_kernels()",
                          "keep_freed_memory()"]
    assert not any("core/memory.py" in _names(stage.module) for stage in TABLE)


def test_code_version_is_stable_hex() -> None:
    version = code_version("index")
    assert re.fullmatch(r"[0-9a-f]{64}", version)
    assert code_version("index") == version
    assert code_version("ops.boxes") != version


def test_code_version_hand_computed_for_one_file() -> None:
    path = provenance.PACKAGE_DIR / "core" / "errors.py"
    expected = hashlib.sha256(b"core/errors.py\0" + path.read_bytes() + b"\0").hexdigest()
    assert code_version("core.errors") == expected


def test_code_version_follows_file_changes(package_copy: Path) -> None:
    index_before, boxes_before, voc_before = code_version("index"), code_version("ops.boxes"), code_version("data.voc")
    with open(package_copy / "data" / "images.py", "a") as f:
        f.write("\n# a change\n")
    assert code_version("index") != index_before  # index -> voc -> images
    assert code_version("data.voc") != voc_before
    assert code_version("ops.boxes") == boxes_before  # does not import images


def test_new_import_adds_a_code_file(package_copy: Path) -> None:
    assert "recall.py" not in _names("ops.boxes")
    (package_copy / "extra.py").write_text("X = 1\n")
    with open(package_copy / "ops" / "boxes.py", "a") as f:
        f.write("\nfrom stages.extra import X\nimport stages.core.errors\n")
    code_files.cache_clear()
    assert _names("ops.boxes") == ["core/errors.py", "extra.py", "ops/boxes.py"]


def test_file_digest_matches_hashlib(tmp_path: Path) -> None:
    small = tmp_path / "small.bin"
    small.write_bytes(b"hello\n")
    assert file_digest(small) == hashlib.sha256(b"hello\n").hexdigest()
    assert file_digest(small) == "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
    # larger than the 1 MiB read block
    data = bytes(range(256)) * 4097
    big = tmp_path / "big.bin"
    big.write_bytes(data)
    assert file_digest(big) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert file_digest(empty) == hashlib.sha256(b"").hexdigest()


def test_files_digest_hand_computed(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"A")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_bytes(b"B")
    expected = hashlib.sha256(
        b"a.txt\0" + hashlib.sha256(b"A").hexdigest().encode() + b"sub/b.txt\0" + hashlib.sha256(b"B").hexdigest().encode()
    ).hexdigest()
    assert files_digest(tmp_path, ["a.txt", "sub/b.txt"]) == expected
    # order and names matter
    assert files_digest(tmp_path, ["sub/b.txt", "a.txt"]) != expected
    (tmp_path / "c.txt").write_bytes(b"A")
    assert files_digest(tmp_path, ["c.txt"]) != files_digest(tmp_path, ["a.txt"])


def test_files_digest_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        files_digest(tmp_path, ["missing.txt"])
