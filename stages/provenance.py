"""What produced an artifact: the code files of a stage, their version, input digests.

A stage's code is its module plus every ``stages`` module it imports, directly
or not. The same list is what ``dvc.yaml`` declares as the stage's code
dependencies (a test checks that) and what Luigi hashes to decide whether an
artifact is stale.
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name


@lru_cache(maxsize=None)
def code_files(module: str) -> tuple[Path, ...]:
    """Sorted source files of ``stages.<module>`` and of the ``stages`` modules it imports."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((PACKAGE_DIR / f"{name}.py").read_text())
        todo += [m for m in _imported_stage_modules(tree) if m not in seen]
    return tuple(sorted(PACKAGE_DIR / f"{name}.py" for name in seen))


def _imported_stage_modules(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            parts = node.module.split(".")[1:]
            found += [parts[0]] if parts else [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name.split(".")[1] for a in node.names if a.name.startswith(f"{PACKAGE}.")]
    return [m for m in found if (PACKAGE_DIR / f"{m}.py").is_file()]


def code_version(module: str) -> str:
    """sha256 over the stage's code files (names and contents)."""
    digest = hashlib.sha256()
    for path in code_files(module):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_digest(root: str | Path, relative_paths: list[str]) -> str:
    """sha256 over the names and contents of ``relative_paths`` under ``root``, in the given order."""
    digest = hashlib.sha256()
    for rel in relative_paths:
        digest.update(rel.encode() + b"\0" + file_digest(Path(root) / rel).encode())
    return digest.hexdigest()
