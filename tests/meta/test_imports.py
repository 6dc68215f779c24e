"""The import graph of ``beit`` follows the layer table of docs/architecture.md: no cycle, every arrow down.

Every import counts, wherever it runs: module and class bodies, and function bodies too (an import inside a
function is an arrow like any other; it only runs later). Importing ``a.b.c`` also imports the packages
``a.b`` and ``a`` that the importer is not itself inside (an arrow where that ``__init__`` imports modules of
the package; an empty one runs nothing); ``from pkg import name`` is an arrow to ``pkg``
when ``name`` is not a module of it, even when ``pkg`` is the importer's own package (its ``__init__``
runs the names it exports). Imports of other packages (torch, the standard library) are not arrows; inside
a function body only the optional or heavy ones of :data:`LAZY_THIRD_PARTY` may be imported (start-up speed).

The layer table is read from docs/architecture.md ("## Layers"), so the document and the check cannot drift.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT

PACKAGE = ROOT / "beit"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# Arrows allowed against the rules, each with its reason. Only this one: the method registry imports its
# own package to find the methods (a plugin pattern: every module of beit/methods registers itself).
ALLOWED = {("beit.methods.registry", "beit.methods"): "plugin discovery: the registry imports its package"}

# Third-party packages that may be imported inside a function body, each with why it is imported late.
LAZY_THIRD_PARTY = {
    "torch": "heavy: the CLI parses (--help, presets, --version) without it and imports it when a command runs",
    "matplotlib": "heavy (~0.3 s and a font cache); pictures only",
    "torchvision": "heavy; transforms and pictures only, `import beit` and beit.load need none of it",
    "torch.utils.tensorboard": "optional: the tensorboard package, with train.tensorboard=true only",
    "torch.nn.attention.flex_attention": "optional: torch >= 2.7 only (a fused kernel; SDPA otherwise)",
    "transformers": "optional integration (HF), `pip install beit[interop]`",
    "timm": "optional integration, `pip install beit[interop]`",
    "dall_e": "optional: DALL-E tokenizer conversion only",
    "wandb": "optional logger",
    "mlflow": "optional logger",
    "datasets": "optional: --data on an HF datasets folder, `pip install beit[shards]`",
}


# --------------------------------------------------------------------------------------------- the graph


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _imports(tree: ast.Module):
    """``(node, in_function)`` for every import statement of a module, wherever it is."""
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                      ast.Lambda)))
    yield from walk(tree, False)


def _origin(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = name if is_package else name.rpartition(".")[0]
    base = package.split(".")
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(node, name: str, is_package: bool, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """``(explicit, implied)``: the modules an import names, and the packages above them it loads."""
    if isinstance(node, ast.Import):
        named = {a.name for a in node.names}
    else:
        origin = _origin(node, name, is_package)
        named = set()
        for a in node.names:  # ``from pkg import mod`` imports the submodule; another name comes from pkg
            named.add(f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin)
    implied = {".".join(t.split(".")[:i]) for t in named for i in range(1, t.count(".") + 1)}
    return named, implied - named


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (every import, function bodies included)."""
    named_by: dict[str, set[str]] = {}
    implied_by: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        # the packages around a module are imported before it: loading them is no arrow of its own
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        named_by[name], implied_by[name] = set(), set()
        for node, _ in _imports(tree):
            named, implied = _targets(node, name, is_package, modules)
            named_by[name] |= {t for t in named if t in modules and t != name}
            implied_by[name] |= {t for t in implied if t in modules and t != name and t not in ancestors}
    # a package loaded on the way to its module is an arrow when its __init__ imports something of ours
    return {name: named_by[name] | {t for t in implied_by[name] if named_by[t]} for name in modules}


def lazy_third_party(modules: dict[str, Path]) -> list[str]:
    """``module:line name`` for each import of another package inside a function body."""
    found = []
    package = next(iter(modules)).split(".")[0]
    for name, path in modules.items():
        for node, in_function in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if not in_function or (isinstance(node, ast.ImportFrom) and node.level):
                continue
            for target in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]):
                if target.split(".")[0] != package:
                    found.append(f"{name}:{node.lineno} {target}")
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


# --------------------------------------------------------------------------------------------- the layers


def read_layers(text: str, package: str = "beit") -> dict[str, int]:
    """The layer table of an architecture document: rows ``| N | `mod`, `mod.sub`, ... | what |`` under
    ``## Layers``; ``{module prefix: N}`` (``beit`` itself names the package's ``__init__``)."""
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for number, cell in re.findall(r"^\|\s*(\d+)\s*\|([^|]*)\|", section, re.M):
        for mod in re.findall(r"`([\w.]+)`", cell):
            full = package if mod == package else f"{package}.{mod}"
            assert full not in layers, f"{mod} is in two layers"
            layers[full] = int(number)
    return layers


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    """The layer of the most specific entry naming ``module`` or a package above it (None: no entry)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in layers and (i == len(parts) or ".".join(parts[:i]) != parts[0]):
            return layers[".".join(parts[:i])]
    return None


def upward_arrows(graph: dict[str, set[str]], layers: dict[str, int],
                  allowed: dict[tuple[str, str], str] | None = None) -> list[str]:
    """Every arrow from a layer to a higher one (an arrow within a layer is allowed; cycles are checked apart)."""
    allowed = ALLOWED if allowed is None else allowed
    return [f"{a} (layer {layer_of(a, layers)}) -> {b} (layer {layer_of(b, layers)})"
            for a in sorted(graph) for b in sorted(graph[a])
            if (a, b) not in allowed and layer_of(a, layers) < layer_of(b, layers)]


def without_allowed(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {a: {b for b in bs if (a, b) not in ALLOWED} for a, bs in graph.items()}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(module_names())


@pytest.fixture(scope="module")
def layers() -> dict[str, int]:
    return read_layers(ARCHITECTURE.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------- the checker


def test_the_checker_counts_lazy_imports_and_finds_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    import json\n")
    graph = import_graph(module_names(pkg))
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == set()  # an empty sub/__init__: no arrow
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("")
    assert import_graph(module_names(pkg))["pkg.a"] == {"pkg.sub", "pkg.sub.b"}
    assert find_cycle(graph) is None
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n")  # inside a function: an arrow all the same
    graph = import_graph(module_names(pkg))
    assert graph["pkg.sub.b"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (pkg / "sub" / "b.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from ..a import x\n")
    assert find_cycle(import_graph(module_names(pkg))) == ["pkg.a", "pkg.sub", "pkg.a"]
    # a name taken from one's own package's __init__ is an arrow to it
    (pkg / "sub" / "__init__.py").write_text("from .c import helper\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from . import helper\n")
    assert import_graph(module_names(pkg))["pkg.sub.b"] == {"pkg.sub"}


def test_the_checker_reports_an_upward_import_inside_a_function(tmp_path):
    """A deliberately added upward import, in a tiny package with its own layer table, is reported; and an
    upward arrow (and a cycle) injected into beit's own graph is reported too."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("import os\n\n\ndef f():\n    return os.sep\n")
    (pkg / "high.py").write_text("from .low import f\n")
    table = ("# x\n\n## Layers\n\n| layer | modules | what |\n|---|---|---|\n"
             "| 0 | `low` | below |\n| 1 | `high` | above |\n| 2 | `pkg` | the package |\n\n## Next\n")
    layers = read_layers(table, "pkg")
    assert layers == {"pkg.low": 0, "pkg.high": 1, "pkg": 2}
    assert upward_arrows(import_graph(module_names(pkg)), layers, {}) == []
    (pkg / "low.py").write_text("def f():\n    from .high import g\n    return g\n")
    assert upward_arrows(import_graph(module_names(pkg)), layers, {}) == ["pkg.low (layer 0) -> pkg.high (layer 1)"]
    assert lazy_third_party(module_names(pkg)) == []
    (pkg / "low.py").write_text("def f():\n    import yaml\n")
    assert lazy_third_party(module_names(pkg)) == ["pkg.low:2 yaml"]

    real = import_graph(module_names())
    real_layers = read_layers(ARCHITECTURE.read_text(encoding="utf-8"))
    bad = {**real, "beit.models.vit": real["beit.models.vit"] | {"beit.runs"}}
    assert upward_arrows(bad, real_layers) == [f"beit.models.vit (layer {layer_of('beit.models.vit', real_layers)})"
                                              f" -> beit.runs (layer {layer_of('beit.runs', real_layers)})"]
    looped = {**real, "beit.config": real["beit.config"] | {"beit.cli"}}
    assert find_cycle(without_allowed(looped)) is not None


# --------------------------------------------------------------------------------------------- beit


def test_the_layer_table_names_every_module(graph, layers):
    """Every module of beit has a layer, every entry of the table names a module, the allowed list is live."""
    assert [m for m in graph if layer_of(m, layers) is None] == []
    assert [e for e in layers if not any(m == e or m.startswith(e + ".") for m in graph)] == []
    assert [f"{a} -> {b}" for a, b in ALLOWED if b not in graph.get(a, ())] == []


def test_no_import_cycles(graph):
    cycle = find_cycle(without_allowed(graph))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_import_goes_down_the_layers(graph, layers):
    assert upward_arrows(graph, layers) == []


def test_the_layering_rules_of_the_design_hold(graph):
    """What the layers are for, said as arrows that must not exist (whatever the table's numbers)."""
    def reaches(a: str, b: str) -> list[str]:
        return [f"{m} -> {t}" for m in graph if m == a or m.startswith(a + ".")
                for t in graph[m] if t == b or t.startswith(b + ".")]

    rules = [("beit.models", "beit.runs"), ("beit.models", "beit.loading"), ("beit.engine", "beit.tasks"),
             ("beit.engine", "beit.viz"), ("beit.engine", "beit.tokenizers"), ("beit.tasks", "beit.cli"),
             ("beit.tasks", "beit.demo"), ("beit.tasks", "beit.viz.attention"), ("beit.tasks", "beit.viz.mim"),
             ("beit.tasks", "beit.viz.mae"), ("beit.viz", "beit.demo"), ("beit.demo", "beit.cli"),
             ("beit.tokenizers", "beit.tasks")]
    assert [arrow for a, b in rules for arrow in reaches(a, b)] == []


def test_lazy_imports_of_other_packages_are_optional_or_heavy():
    """Inside a function body, only the packages of LAZY_THIRD_PARTY (each with its reason) are imported."""
    found = [f for f in lazy_third_party(module_names())
             if not any(f.split()[1] == p or f.split()[1].startswith(p + ".") for p in LAZY_THIRD_PARTY)]
    assert found == []


def test_every_module_imports_alone():
    names = [n for n in module_names() if n != "beit.__main__"]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'beit' or m.startswith('beit.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def test_no_private_cross_imports():
    """No module imports another module's private names (``from .x import _y``): what is shared is public."""
    found = []
    for name, path in module_names().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("beit")):
                found += [f"{name}: from {'.' * node.level}{node.module or ''} import {a.name}"
                          for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    assert found == []
