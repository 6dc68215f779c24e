"""Reading this project's run folders: a run's backbone, its whole trained module, a checkpoint to resume.

Every read goes through a verified checkpoint folder (:meth:`beit.runs.RunDir.checkpoint`: content hashes
and finiteness checked once), then :func:`beit.checkpoint_io.load_weights` without checking twice.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..checkpoint import verify_checkpoint
from ..checkpoint_io import CheckpointError, load_weights, read_json
from ..config import ModelConfig, from_dict, to_dict
from ..models.vit import VisionTransformer
from ..runs import RunDir, run_kind
from .weights import build_and_load, without_head

log = logging.getLogger("beit")

__all__ = ["BACKBONE_HINT", "load_run", "read_checkpoint", "run_backbone_state", "run_weights"]

BACKBONE_HINT = "give a pretraining or fine-tuning run, or a model file"


def read_checkpoint(ckpt: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor]]:
    """``(model_state, state_json, state_tensors)`` of a checkpoint directory, verified first: what the
    engine resumes from (weights, then optimizer, scaler and RNG state)."""
    ckpt = verify_checkpoint(ckpt)  # content hashes and finiteness: not checked again while reading
    model_state = load_weights(ckpt / "model.safetensors", verified=True)[0]
    state = read_json(ckpt / "state.json") if (ckpt / "state.json").is_file() else {}
    has_state = (ckpt / "state.safetensors").is_file()
    tensors = load_weights(ckpt / "state.safetensors", verified=True)[0] if has_state else {}
    return model_state, state, tensors


def run_weights(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(resolved config dict, every weight of the trained module)`` of a run or checkpoint directory: what
    rebuilds a whole trained module (a segmenter with its heads, an MAE method with its decoder)."""
    run = RunDir(path)
    ck = run.checkpoint()  # verified: hashes and finiteness
    return run.config(), load_weights(ck / "model.safetensors", verified=True)[0]


def _backbone_prefix(path: Path, state: dict, which: str | None) -> str:
    """The weights' prefix for ``which`` (None: the default backbone) from a checkpoint's ``state.json``."""
    prefix = state.get("state_prefix", "model.")
    named = state.get("backbones") or {}
    if isinstance(prefix, dict):  # checkpoints written before ``backbones``: the first entry is the default
        named, prefix = prefix, next(iter(prefix.values()))
    if which is None:
        return prefix
    if not named:
        log.warning("--which %s ignored: this run has one set of weights", which)
        return prefix
    if which not in named:
        raise CheckpointError(f"{path}: no {which!r} weights; choose one of {', '.join(named)}")
    return named[which]


def run_backbone_state(path: str | Path, which: str | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(model config, backbone state dict in our names) of a run or checkpoint directory; ``which`` names one
    of the run's backbones (iBOT: ``teacher``, the default, or ``student``)."""
    run = RunDir(path)
    ck = run.checkpoint()
    cfg_dict = run.config()
    if run_kind(cfg_dict) == "tokenizer":
        raise CheckpointError(f"{run.path} is a tokenizer run, not a backbone: {BACKBONE_HINT}")
    if not isinstance(cfg_dict.get("model"), dict):
        raise CheckpointError(f"{run.path}: its config has no model section")
    state = read_json(ck / "state.json") if (ck / "state.json").is_file() else {}
    prefix = _backbone_prefix(run.path, state, which)
    # run.checkpoint() verified the folder that holds it (hashes, finiteness): not checked twice
    weights = load_weights(ck / "model.safetensors", verified=True)[0]
    sd = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if not sd:
        raise CheckpointError(f"{ck}: no weights under {prefix!r}")
    return from_dict(ModelConfig, cfg_dict["model"], prefix="model."), sd


def load_run(path: str | Path, which: str | None = None, **overrides) -> VisionTransformer:
    """The backbone of a run, with its heads; ``overrides`` change ``ModelConfig`` fields."""
    saved, sd = run_backbone_state(path, which)
    overrides, sd, strict = without_head(saved, sd, overrides)
    cfg = from_dict(ModelConfig, {**to_dict(saved), **overrides}, prefix="model.") if overrides else saved
    return build_and_load(cfg, sd, strict=strict, old_grid=saved.grid_size)
