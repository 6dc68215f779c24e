"""No function in ``beit/`` is longer than 80 lines, unless its docstring says why (with the words
"longer than 80 lines because")."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers.paths import ROOT

PACKAGE = ROOT / "beit"
LIMIT = 80


def long_functions(root: Path = PACKAGE, limit: int = LIMIT) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                why = "longer than 80 lines because" in (ast.get_docstring(node) or "")
                if lines > limit and not why:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_checker_counts_lines(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))
    (tmp_path / "m.py").write_text(f"def long():\n{body}\n\n\ndef explained():\n"
                                   f'    """It is longer than 80 lines because a table reads best whole."""\n{body}\n')
    assert [f.split()[1] for f in long_functions(tmp_path)] == ["long"]


def test_no_long_functions():
    assert long_functions() == []
