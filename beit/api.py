"""``beit.load``: one call for every kind of weights this project reads.

- a tokenizer (``tokenizer.safetensors`` or a folder/run holding one) -> :class:`beit.models.dvae.Tokenizer`;
- a run directory of this project (pretraining, fine-tuning, ...) or one of its checkpoint directories
  -> :class:`beit.models.vit.VisionTransformer` with the run's heads (a BEiT pretraining run gives the
  masked-image-modeling model; a fine-tuning run the classifier);
- an HF transformers folder, a timm state dict, an official BEiT checkpoint -> ``VisionTransformer``.

Nothing is unpickled: safetensors, JSON and YAML only; ``.pth``/``.bin`` files go through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from . import interop
from .checkpoint import CKPT_DIR, CheckpointError, latest_checkpoint
from .config import ModelConfig, from_dict, to_dict
from .models.vit import VisionTransformer

log = logging.getLogger("beit")


def load(path: str | Path, *, which: str | None = None, device: str | torch.device = "cpu", **overrides: Any):
    """Load a model or tokenizer from ``path``; ``overrides`` change ``ModelConfig`` fields (e.g.
    ``img_size=64`` resizes position tables, ``num_classes=10`` adds a fresh head). ``which`` picks the
    student or teacher of an iBOT run (teacher by default)."""
    from .models.dvae import is_tokenizer_file, load_tokenizer

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if is_tokenizer_file(p):
        return load_tokenizer(p, device=device)
    if p.is_dir() and ((p / CKPT_DIR).is_dir() or (p / "config.yaml").is_file()):
        return load_run(p, which=which, **overrides).to(device)
    return interop.load_any(p, **overrides)[1].to(device)


def _checkpoint_dir(p: Path) -> Path:
    if (p / CKPT_DIR).is_dir():
        ck = latest_checkpoint(p)
        if ck is None:
            raise CheckpointError(f"{p}: the run has no complete checkpoint yet")
        return ck
    return p


def run_config(path: str | Path) -> dict:
    """The resolved config (a dict) saved with a run or checkpoint directory."""
    p = Path(path)
    ck = _checkpoint_dir(p)
    for cand in (ck / "config.yaml", p / "config.yaml"):
        if cand.is_file():
            return yaml.safe_load(cand.read_text()) or {}
    raise CheckpointError(f"{p}: no config.yaml next to the checkpoint")


def run_backbone_state(path: str | Path, which: str | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(model config, backbone state dict in our names) of a run or checkpoint directory."""
    from safetensors.torch import load_file

    p = Path(path)
    ck = _checkpoint_dir(p)
    cfg_dict = run_config(p)
    if "model" not in cfg_dict:
        raise CheckpointError(f"{p}: its config has no model section (is it a tokenizer run?)")
    state = json.loads((ck / "state.json").read_text()) if (ck / "state.json").is_file() else {}
    prefix = state.get("state_prefix", "model.")
    if isinstance(prefix, dict):
        choice = which or state.get("default_which") or next(iter(prefix))
        if choice not in prefix:
            raise CheckpointError(f"{p}: no {choice!r} weights; choose one of {', '.join(prefix)}")
        prefix = prefix[choice]
    elif which:
        log.warning("--which %s ignored: this run has one set of weights", which)
    weights = load_file(ck / "model.safetensors")
    sd = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if not sd:
        raise CheckpointError(f"{ck}: no weights under {prefix!r}")
    model_cfg = cfg_dict["model"]
    if isinstance(cfg_dict.get("backbone_model"), dict):  # methods whose saved backbone differs (MAE encoder)
        model_cfg = cfg_dict["backbone_model"]
    return from_dict(ModelConfig, model_cfg, prefix="model."), sd


def load_run(path: str | Path, which: str | None = None, **overrides: Any) -> VisionTransformer:
    cfg, sd = run_backbone_state(path, which)
    if overrides:
        cfg = from_dict(ModelConfig, {**to_dict(cfg), **overrides}, prefix="model.")
    return interop.build_and_load(cfg, sd, strict=not overrides)


def backbone_state(path: str | Path, which: str | None = None) -> dict[str, torch.Tensor]:
    """Backbone weights (our names) from anything :func:`load` reads, for initialising another model."""
    p = Path(path)
    if p.is_dir() and ((p / CKPT_DIR).is_dir() or (p / "config.yaml").is_file()):
        return run_backbone_state(p, which)[1]
    model = load(p, which=which)
    if not isinstance(model, VisionTransformer):
        raise CheckpointError(f"{p}: not a vision transformer checkpoint (a tokenizer?)")
    return model.state_dict()


def init_from(path: str | Path, cfg: ModelConfig, which: str | None = None) -> VisionTransformer:
    """``VisionTransformer(cfg)`` initialised from the backbone in ``path`` (heads not taken when their
    shape differs; shared relative position bias copied into each layer when ``cfg`` has per-layer tables;
    position tables resized to ``cfg``'s grid). Fails if any block weight is missing."""
    sd = backbone_state(path, which)
    # pretraining heads never serve a downstream model
    sd = {k: v for k, v in sd.items() if not k.startswith(("lm_head.", "head.", "mask_token"))
          and not (k.startswith("norm.") and cfg.use_mean_pooling and cfg.num_classes > 0)}
    model = VisionTransformer(cfg)
    sd = interop.adapt_state_dict(sd, model)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit the model ({e.args[0].splitlines()[-1].strip()})") from None
    body = [k for k in missing if k.startswith(("blocks.", "patch_embed."))]
    if body:
        raise CheckpointError(f"{path}: missing backbone weights {body[:4]} (a different architecture?)")
    log.info("initialised from %s (fresh: %s; unused: %s)", path, ", ".join(sorted(missing)) or "none",
             ", ".join(sorted(unexpected)) or "none")
    return model
