"""Run checkpoints: weights and training state as safetensors + JSON, written atomically.

Layout of a run directory::

    RUN/config.yaml                      the fully resolved config of the run
    RUN/metrics.jsonl                    one JSON object per logged step / evaluation
    RUN/checkpoints/latest               name of the newest complete checkpoint (replaced atomically)
    RUN/checkpoints/step_00001000/       model.safetensors, state.safetensors, state.json, config.yaml
    RUN/checkpoints/best/                (tasks) weights of the best evaluation so far

A checkpoint directory is written under a temporary name and renamed into place; only then does
``latest`` move to it. A crash at any point leaves the previous checkpoint intact and ``latest`` pointing
at it. Nothing here unpickles: tensors are safetensors, everything else is JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .checkpoint_io import CheckpointError

CKPT_DIR = "checkpoints"
__all__ = ["CKPT_DIR", "CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]


# --------------------------------------------------------------------------------------------- flattening


def _flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and a JSON skeleton."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton: dict[str, Any] = {"state": {}, "param_groups": []}
    for idx, st in opt_state["state"].items():
        entry = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                key = f"optim.{idx}.{k}"
                tensors[key] = v.detach().contiguous().cpu()
                entry[k] = {"tensor": key}
            else:
                entry[k] = v
        skeleton["state"][str(idx)] = entry
    for g in opt_state["param_groups"]:
        skeleton["param_groups"].append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, skeleton


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], skeleton: dict) -> dict:
    state = {}
    for idx, entry in skeleton["state"].items():
        state[int(idx)] = {
            k: (tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v) for k, v in entry.items()
        }
    groups = []
    for g in skeleton["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))


# --------------------------------------------------------------------------------------------- write / read


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_dir_atomically(final: Path, write) -> None:
    """Call ``write(tmp_dir)``, then rename ``tmp_dir`` to ``final`` (replacing an older one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    state: dict | None = None,
    config_yaml: str | None = None,
    keep: int = 2,
) -> Path:
    """Write ``RUN/checkpoints/step_XXXXXXXX`` atomically, point ``latest`` at it, prune older ones."""
    ckdir = Path(run_dir) / CKPT_DIR
    name = f"step_{step:08d}"
    state = dict(state or {})
    state["step"] = step

    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors")
        tensors, rng_meta = rng_state()
        state["rng"] = rng_meta
        if optimizer is not None:
            opt_tensors, skeleton = _flatten_optimizer(optimizer.state_dict())
            tensors.update(opt_tensors)
            state["optimizer"] = skeleton
        if scaler is not None and scaler.is_enabled():
            state["scaler"] = {k: (float(v) if torch.is_tensor(v) else v) for k, v in scaler.state_dict().items()}
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(state))
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)

    _write_dir_atomically(ckdir / name, write)
    _write_text_atomically(ckdir / "latest", name + "\n")
    olds = sorted(p for p in ckdir.glob("step_*") if p.is_dir() and p.name != name)
    for p in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return ckdir / name


def save_weights_dir(path: str | Path, model_state: dict[str, torch.Tensor], info: dict, config_yaml: str | None) -> None:
    """Weights-only checkpoint directory (``best``), written atomically."""

    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors")
        (tmp / "state.json").write_text(json.dumps(info))
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)

    _write_dir_atomically(Path(path), write)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckdir = Path(run_dir) / CKPT_DIR
    pointer = ckdir / "latest"
    if pointer.is_file():
        cand = ckdir / pointer.read_text().strip()
        if (cand / "model.safetensors").is_file() and (cand / "state.json").is_file():
            return cand
    # fall back to the newest complete directory (e.g. the pointer was lost)
    for cand in sorted(ckdir.glob("step_*"), reverse=True):
        if (cand / "model.safetensors").is_file() and (cand / "state.json").is_file():
            return cand
    return None


def load_checkpoint(ckpt: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor]]:
    """Return (model_state, state_json, state_tensors) of a checkpoint directory."""
    ckpt = Path(ckpt)
    if not (ckpt / "model.safetensors").is_file():
        raise CheckpointError(f"{ckpt}: not a checkpoint directory (no model.safetensors)")
    model_state = load_file(ckpt / "model.safetensors")
    state = json.loads((ckpt / "state.json").read_text()) if (ckpt / "state.json").is_file() else {}
    tensors = load_file(ckpt / "state.safetensors") if (ckpt / "state.safetensors").is_file() else {}
    return model_state, state, tensors


def restore_training_state(
    state: dict,
    tensors: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    if scaler is not None and "scaler" in state and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    if "rng" in state:
        set_rng_state(tensors, state["rng"])
