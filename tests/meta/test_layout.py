"""The tests' own layout: every test file sits in a folder that mirrors what it tests, and no test edits
``sys.path`` (shared modules are imported as ``tests.helpers.*``, benchmarks as ``bench.*``).

Where a test goes:
  tests/<pkg>/    a test of beit/<pkg>/ (models, data, engine, methods, tasks, tokenizers, viz, demo, cli)
  tests/core/     a test of a top-level module beit/<module>.py (checkpoint*, masking, precision, ...)
  tests/faults/   the fault catalogue: a user's mistakes driven through the CLI
  tests/docs/     README and docs/ checked against the code
  tests/meta/     the code base's structure (imports, function length, this layout)
  tests/gpu/      CUDA-only checks and the GPU check's dry run
  tests/helpers/  shared modules and drivers, no tests (run a driver as ``python -m tests.helpers.NAME``)
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers.paths import ROOT

TESTS = ROOT / "tests"
FOLDERS = {"bench", "models", "data", "engine", "methods", "tasks", "tokenizers", "viz", "demo", "cli", "core", "faults", "docs",
           "meta", "gpu", "helpers"}


def layout_problems(tests: Path) -> list[str]:
    """Test files directly in tests/, folders outside the list, folders that are not packages, tests in helpers/."""
    problems = [f"{p.name}: a test file directly in tests/ (move it to the folder of what it tests)"
                for p in sorted(tests.glob("*.py")) if p.name not in ("conftest.py", "__init__.py")]
    for folder in sorted(p for p in tests.iterdir() if p.is_dir() and p.name != "__pycache__"):
        if folder.name not in FOLDERS:
            problems.append(f"{folder.name}/: not one of the folders of tests/meta/test_layout.py")
        if not (folder / "__init__.py").is_file():
            problems.append(f"{folder.name}/: no __init__.py (its modules must import as tests.{folder.name}.*)")
    problems += [f"helpers/{p.name}: tests belong in a folder of what they test, not in helpers/"
                 for p in sorted((tests / "helpers").glob("test_*.py"))]
    return problems


def path_edits(source: str) -> list[int]:
    """Lines that change ``sys.path`` (insert, append, extend, assignment) or import a test module by its bare
    name, which only worked while tests/ itself was on the path."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys":
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("test_"):
            lines.append(node.lineno)
        elif isinstance(node, ast.Import) and any(a.name.startswith("test_") for a in node.names):
            lines.append(node.lineno)
    return sorted(set(lines))


def test_every_test_file_is_in_its_folder():
    assert not layout_problems(TESTS), "\n".join(layout_problems(TESTS))


def test_no_test_edits_sys_path():
    found = [f"{p.relative_to(ROOT)}:{n}" for p in sorted(TESTS.rglob("*.py")) for n in path_edits(p.read_text())]
    assert not found, "sys.path edited or a test imported by bare name (use tests.<folder>.<module>): " \
        + ", ".join(found)


def test_the_checks_catch_a_misplaced_file_and_a_path_edit(tmp_path):
    """The checks above fail on what they guard against (a flat test file, a sys.path insert, a bare import)."""
    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "__init__.py").write_text("")
    (tmp_path / "test_flat.py").write_text("")
    (tmp_path / "misc").mkdir()
    problems = layout_problems(tmp_path)
    assert any(p.startswith("test_flat.py") for p in problems)
    assert any(p.startswith("misc/: not one") for p in problems) and any(p.startswith("misc/: no __init__")
                                                                         for p in problems)
    assert path_edits("import sys\nsys.path.insert(0, 'x')\n") == [2]
    assert path_edits("from test_segment import f\nimport test_vit\n") == [1, 2]
    assert path_edits("import sys\nfrom tests.helpers.paths import ROOT\nprint(sys.argv)\n") == []

