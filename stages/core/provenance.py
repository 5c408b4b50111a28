"""What produced an artifact: the code files of a stage, their version, input digests.

A stage's code is its module plus every ``stages`` module it imports, directly
or not (the import closure). Package ``__init__.py`` files are left out: they
are kept empty (a test checks), so they hold nothing a stage's output depends on. The same list is what the generated ``dvc.yaml``
declares as the stage's code dependencies and what is hashed into each
artifact's ``code_version``.
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
PACKAGE = PACKAGE_DIR.name


def module_file(module: str) -> Path | None:
    """Source file of module ``stages.<module>`` (dotted below the package: ``core.config``); None for a package."""
    path = PACKAGE_DIR.joinpath(*module.split(".")).with_suffix(".py") if module else None
    return path if path is not None and path.is_file() else None


@lru_cache(maxsize=None)
def code_files(module: str) -> tuple[Path, ...]:
    """Sorted source files of ``stages.<module>`` and of the ``stages`` modules it imports."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += _imported_stage_modules(ast.parse(path.read_text()))
    return tuple(sorted(seen))


def _imported_stage_modules(tree: ast.AST) -> list[str]:
    """Dotted names below ``stages`` that ``tree`` imports (``from stages.core import layout`` -> core.layout)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            parent = node.module.partition(".")[2]
            found.append(parent)
            found += [f"{parent}.{a.name}".lstrip(".") for a in node.names
                      if module_file(f"{parent}.{a.name}".lstrip("."))]
        elif isinstance(node, ast.Import):
            found += [a.name.partition(".")[2] for a in node.names if a.name.startswith(f"{PACKAGE}.")]
    return found


def code_version(module: str) -> str:
    """sha256 over the stage's code files (paths below the package and contents)."""
    digest = hashlib.sha256()
    for path in code_files(module):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
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
