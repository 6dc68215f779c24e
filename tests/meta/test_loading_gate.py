"""One way in for weights: only ``beit/loading/`` (and the file formats of ``beit/checkpoint_io.py``) open a
checkpoint or a foreign weights file.

Every module of ``beit`` is parsed (the AST, so comments and docstrings do not count) and each call or import
of a weight reader is reported with its place: the third-party readers (``safetensors.safe_open``,
``safetensors.torch.load_file`` / ``load``, ``torch.load``) and the readers of ``checkpoint_io``. Writing,
JSON and the integrity checks (hashes, finiteness) are not reading weights and stay where they are.
"""

from __future__ import annotations

import ast
from pathlib import Path

from beit import checkpoint_io
from tests.helpers.paths import ROOT

PACKAGE = ROOT / "beit"
ALLOWED = ("beit/checkpoint_io.py", "beit/loading/")  # the file formats, and the one way in

# checkpoint_io's functions that hand back what a weights file holds (tensors, or its header for a format probe)
READERS = {"read_safetensors", "load_weights", "read_torch_file", "safetensors_metadata"}
# checkpoint_io's other public functions, and why they are not a way in for weights
NOT_READERS = {
    "read_json": "JSON (configs, state.json, manifests), no weights",
    "nonfinite_in_file": "a check: names of non-finite tensors, nothing handed back",
    "digest_problem": "a check: the SHA-256 a file records against its content",
    "recorded_digest": "a check: the SHA-256 recorded in a header",
    "file_digest": "hashing bytes",
    "check_finite": "a check on tensors in memory",
    "nonfinite_tensors": "a check on tensors in memory",
    "describe_tensors": "wording",
    "holding_nonfinite": "wording",
    "removed_on_failure": "writing",
    "save_weights": "writing",
    "write_safetensors": "writing",
    "seal": "writing",
    "sealable": "writing",
    "write_error": "writing",
}
# third-party readers: (module the name comes from, name)
THIRD_PARTY = {("safetensors", "safe_open"), ("safetensors.torch", "load_file"), ("safetensors.torch", "load"),
               ("torch", "load")}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for an attribute chain on a name, else ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def weight_reads(source: str, where: str = "<snippet>") -> list[str]:
    """``where:line what`` for every import or call of a weight reader in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            for a in node.names:
                if (module, a.name) in THIRD_PARTY or (module.endswith("checkpoint_io") and a.name in READERS):
                    found.append(f"{where}:{node.lineno} import {a.name}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rpartition(".")[2]
            qualified = name.rpartition(".")[0]
            if (last in READERS or last == "safe_open" or (last == "load_file" and "safetensors" in qualified)
                    or (last == "load" and qualified in ("torch", "safetensors.torch"))):
                found.append(f"{where}:{node.lineno} call {name}")
    return found


def test_the_gate_catches_a_deliberately_added_reader():
    """Each way of opening weights, added to a module, is reported; neighbours that open nothing are not."""
    assert weight_reads("from safetensors import safe_open\n\ndef f(p):\n    with safe_open(p, 'pt') as f:\n"
                        "        return f.keys()\n") == ["<snippet>:1 import safe_open", "<snippet>:4 call safe_open"]
    assert weight_reads("import torch\n\ndef f(p):\n    return torch.load(p, weights_only=True)\n") == [
        "<snippet>:4 call torch.load"]
    assert weight_reads("import safetensors.torch\nsd = safetensors.torch.load_file('m.safetensors')\n") == [
        "<snippet>:2 call safetensors.torch.load_file"]
    assert weight_reads("from ..checkpoint_io import load_weights as lw\nsd = lw('m.safetensors')\n") == [
        "<snippet>:1 import load_weights"]  # an alias is caught at its import
    assert weight_reads("from beit import checkpoint_io\nx = checkpoint_io.read_torch_file('a.pth')\n") == [
        "<snippet>:2 call checkpoint_io.read_torch_file"]
    # loading a state dict into a module, JSON, a class method named load, a docstring: not weight reads
    assert weight_reads('"""torch.load(p) in a docstring"""\nimport json\n# torch.load(p)\nm.load_state_dict(sd)\n'
                        "json.load(fh)\nTeacher.load('run')\nread_json('state.json')\n") == []


def test_every_reader_of_checkpoint_io_is_classified():
    """A new public function of checkpoint_io is either a reader (gated) or says why it is not."""
    public = {n for n in checkpoint_io.__all__ if callable(getattr(checkpoint_io, n)) and not isinstance(
        getattr(checkpoint_io, n), type)}
    assert sorted(public - READERS - set(NOT_READERS)) == []
    assert sorted((READERS | set(NOT_READERS)) - public) == []


def test_only_the_loading_layer_opens_weights():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 50
    outside, inside = [], []
    for path in modules:
        rel = path.relative_to(ROOT).as_posix()
        found = weight_reads(path.read_text(encoding="utf-8"), rel)
        (inside if rel.startswith(ALLOWED) else outside).extend(found)
    assert outside == []
    # the gate is not vacuous: the loading layer does read, through checkpoint_io
    assert any(f.startswith("beit/loading/") for f in inside)
    assert any(Path(f.split(":")[0]).name == "checkpoint_io.py" and "safe_open" in f for f in inside)
