"""The backbone of a downstream model (``--init``): from a run of this project or any file :func:`beit.load`
reads, its architecture adopted, its weights fitted to the new model (position tables resized, heads not
taken, shared relative tables spread into the layers).

Following ``--init CKPT`` of ``beit finetune``: :func:`adopt_architecture` reads the checkpoint's model config
(:func:`checkpoint_model_config`), :func:`build_backbone` builds ``VisionTransformer(cfg)`` and fills it
(:func:`init_from`), and on ``--resume`` :func:`resumed_model_config` takes the saved config instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..checkpoint_io import CheckpointError
from ..config import ConfigError, ModelConfig, from_dict, to_dict
from ..models.vit import VisionTransformer
from ..runs import RunDir
from .checkpoints import BACKBONE_HINT, run_backbone_state
from .foreign import load_any
from .tokenizers import is_tokenizer_file
from .weights import fit_weights

log = logging.getLogger("beit")

__all__ = ["adopt_architecture", "backbone_state", "build_backbone", "checkpoint_model_config", "init_from",
           "resumed_model_config"]


def _other_backbone(path: Path) -> VisionTransformer | None:
    """The backbone in a file or folder that is not a run (HF, timm, official BEiT); None for a tokenizer."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if is_tokenizer_file(path):
        return None
    return load_any(path)[1]


def backbone_state(path: str | Path, which: str | None = None) -> dict[str, torch.Tensor]:
    """Backbone weights (our names) from anything :func:`beit.load` reads, for initialising another model."""
    return _backbone_state_and_grid(path, which)[0]


def _backbone_state_and_grid(path: str | Path, which: str | None) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    """Backbone weights and the patch grid (rows, columns) their position tables were made for."""
    p = Path(path)
    if RunDir.holds_run(p):
        cfg, sd = run_backbone_state(p, which)
        return sd, cfg.grid_size
    model = _other_backbone(p)
    if model is None:
        raise CheckpointError(f"{p} is a tokenizer, not a backbone: {BACKBONE_HINT}")
    return model.state_dict(), model.grid_size


def init_from(path: str | Path, cfg: ModelConfig, which: str | None = None) -> VisionTransformer:
    """``VisionTransformer(cfg)`` initialised from the backbone in ``path`` (heads not taken when their
    shape differs; shared relative position bias copied into each layer when ``cfg`` has per-layer tables;
    position tables resized to ``cfg``'s grid). Fails if any block weight is missing."""
    sd, grid = _backbone_state_and_grid(path, which)
    # pretraining heads never serve a downstream model
    sd = {k: v for k, v in sd.items() if not k.startswith(("lm_head.", "head.", "mask_token"))
          and not (k.startswith("norm.") and cfg.use_mean_pooling and cfg.num_classes > 0)}
    model = VisionTransformer(cfg)
    missing, unexpected = fit_weights(model, sd, grid, f"the weights of {path}")
    body = [k for k in missing if k.startswith(("blocks.", "patch_embed."))]
    if body:
        raise CheckpointError(f"{path}: missing backbone weights {body[:4]} (a different architecture?)")
    log.info("initialised from %s (fresh: %s; unused: %s)", path, ", ".join(sorted(missing)) or "none",
             ", ".join(sorted(unexpected)) or "none")
    return model


# Fields that describe the pretrained network itself; they come from the checkpoint, not the preset.
_ARCH_FIELDS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
                "layer_norm_eps", "use_abs_pos_emb", "use_sincos_pos_emb", "layer_scale_init")


def _no_init(init: str) -> bool:
    return not init or init.lower() == "none"


def checkpoint_model_config(path: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of the backbone stored in ``path`` (run directory or any other format)."""
    p = Path(path)
    if RunDir.holds_run(p):
        return run_backbone_state(p)[0]
    model = _other_backbone(p)
    if model is None:
        raise ConfigError(f"--init {path} is a tokenizer, not a backbone: {BACKBONE_HINT}")
    return model.cfg


def adopt_architecture(cfg: ModelConfig, init: str) -> ModelConfig:
    """``cfg`` with the architecture of the checkpoint ``init`` (widths, depth, heads, patch size, position
    scheme, LayerScale); the task's fields (image size, heads, drop path, pooling) stay as configured."""
    if _no_init(init):
        return cfg
    ck = checkpoint_model_config(init)
    changed = {k: getattr(ck, k) for k in _ARCH_FIELDS if getattr(ck, k) != getattr(cfg, k)}
    if not (ck.use_rel_pos_bias or ck.use_shared_rel_pos_bias) and (cfg.use_rel_pos_bias or cfg.use_shared_rel_pos_bias):
        # a backbone pretrained without relative position bias (MAE, iBOT) keeps its absolute positions:
        # the recipe's per-layer tables would start at zero and have nothing to copy from
        changed.update(use_rel_pos_bias=False, use_shared_rel_pos_bias=False)
    if changed:
        log.info("architecture from %s: %s", init, ", ".join(f"{k}={v}" for k, v in changed.items()))
    if ck.img_size != cfg.img_size:
        log.info("checkpoint trained at %dx%d px (height x width), used at %dx%d px: position tables are "
                 "resized from its %dx%d patch grid", *ck.img_hw, *cfg.img_hw, *ck.grid_size)
    return from_dict(ModelConfig, {**to_dict(cfg), **changed}, prefix="model.")


def build_backbone(init: str, cfg: ModelConfig) -> VisionTransformer:
    """``VisionTransformer(cfg)``, initialised from ``init`` unless it is empty or ``none``."""
    if _no_init(init):
        return VisionTransformer(cfg)
    return init_from(init, cfg)


def resumed_model_config(out: str | Path, resume: bool) -> ModelConfig | None:
    """The model config saved in run ``out`` when it is being resumed from a checkpoint: the weights then
    come from the checkpoint, so ``--init`` is neither read again nor needed any more."""
    return RunDir(out).resumable_model_config() if resume else None
