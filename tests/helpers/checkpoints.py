"""Checkpoints as older versions of the tool wrote them, for the tests that read them back."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from beit.checkpoint import MANIFEST


def as_written_before_manifests(ck: Path) -> None:
    """Turn a checkpoint into one of a version before manifests: no manifest, no ``format`` in state.json, no
    SHA-256 in the safetensors headers."""
    (ck / MANIFEST).unlink()
    for name in ("model.safetensors", "state.safetensors"):
        save_file(load_file(ck / name), ck / name)
    state = json.loads((ck / "state.json").read_text())
    del state["format"]
    (ck / "state.json").write_text(json.dumps(state))
