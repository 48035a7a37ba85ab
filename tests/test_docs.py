"""docs/ARCHITECTURE.md is true to the code: its module map lists every module and names none that
does not exist; every module it maps opens with a one-line docstring; and the error list names every
error class of ``core/errors.py``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
PACKAGES = ("core", "manifests", "pipeline", "heads", "reports", "workflows", "serve", "commands", "synthetic")


def module_map() -> str:
    """The text of the "Module map" section's code block."""
    text = DOC.read_text()
    section = text.split("## Module map", 1)[1]
    return section.split("```", 2)[1]


def mapped() -> set[str]:
    return set(re.findall(r"(?<![\w/.])((?:[a-z_0-9]+/)+[a-z_0-9]+\.py|cli\.py)\b", module_map()))


def modules() -> set[str]:
    found = {"cli.py"}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if path.name != "__init__.py":
                found.add(path.relative_to(ROOT).as_posix())
    return found


def test_the_module_map_lists_every_module_and_no_other() -> None:
    missing = modules() - mapped()
    stale = {m for m in mapped() if not (ROOT / m).is_file()}  # a package's __init__.py or a test may be named
    assert not missing, f"modules missing from docs/ARCHITECTURE.md's module map: {sorted(missing)}"
    assert not stale, f"docs/ARCHITECTURE.md's module map names modules that do not exist: {sorted(stale)}"


def test_every_module_opens_with_a_docstring() -> None:
    bare = [m for m in sorted(modules()) if not ast.get_docstring(ast.parse((ROOT / m).read_text()))]
    assert not bare, f"modules without an opening docstring: {bare}"


def test_the_error_list_names_every_error() -> None:
    tree = ast.parse((ROOT / "core" / "errors.py").read_text())
    errors = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    text = DOC.read_text()
    absent = sorted(e for e in errors if e not in text)
    assert not absent, f"docs/ARCHITECTURE.md does not name these errors of core/errors.py: {absent}"
