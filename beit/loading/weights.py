"""Fitting a state dict (our names) into a :class:`~beit.models.vit.VisionTransformer`.

Every loader of :mod:`beit.loading` ends here: position tables resized to the model's grid, shared and
per-layer relative tables converted, heads whose shape no longer fits dropped, and the load checked.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..checkpoint_io import CheckpointError
from ..config import ModelConfig
from ..models.positions import REL_TABLE, resize_pos_and_rel_tables
from ..models.vit import VisionTransformer, uses_fc_norm

log = logging.getLogger("beit")

__all__ = ["adapt_state_dict", "build_and_load", "fit_weights", "without_head"]


def adapt_state_dict(state_dict: dict[str, torch.Tensor], model: VisionTransformer,
                     old_grid: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Fit a state dict (our names) to ``model``: resize position tables to its grid (from ``old_grid``,
    square by default), spread a shared relative table into per-layer tables (BEiT fine-tuning) or fold
    per-layer ones into a shared one, keep fixed sin-cos tables of the model, and drop heads whose shape no
    longer matches."""
    sd = resize_pos_and_rel_tables(state_dict, model.grid_size, old_grid)
    shared_key = f"rel_pos_bias.{REL_TABLE}"
    own = model.state_dict()
    if shared_key in sd and shared_key not in own and f"blocks.0.attn.{REL_TABLE}" in own:
        table = sd.pop(shared_key)
        for i in range(model.num_layers):
            k = f"blocks.{i}.attn.{REL_TABLE}"
            sd[k] = table.clone() if k not in sd else sd[k] + table
    if model.cfg.use_sincos_pos_emb:
        sd["pos_embed"] = own["pos_embed"]
    for k in list(sd):
        if k in own and sd[k].shape != own[k].shape and k.split(".")[0] in ("head", "lm_head"):
            log.warning("dropping %s: shape %s does not fit the model's %s (new head)", k,
                        tuple(sd[k].shape), tuple(own[k].shape))
            del sd[k]
    return sd


def fit_weights(model: VisionTransformer, state_dict: dict[str, torch.Tensor], old_grid: tuple[int, int] | None,
                what: str) -> tuple[list[str], list[str]]:
    """Load ``state_dict`` (made for patch grid ``old_grid``) into ``model`` after :func:`adapt_state_dict`,
    leniently: ``(missing, unexpected)`` keys for the caller to judge; a shape that cannot fit is a
    :class:`CheckpointError` naming ``what`` was loaded."""
    sd = adapt_state_dict(state_dict, model, old_grid)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{what} do not fit the model ({e.args[0].splitlines()[-1].strip()})") from None
    return list(missing), list(unexpected)


def build_and_load(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], strict: bool = True,
                   old_grid: tuple[int, int] | None = None) -> VisionTransformer:
    """``VisionTransformer(cfg)`` with ``state_dict`` (made for patch grid ``old_grid``, square by default)
    loaded after :func:`adapt_state_dict`, in eval mode.

    ``strict``: every weight must be used and every parameter provided; otherwise mismatches are logged."""
    model = VisionTransformer(cfg)
    missing, unexpected = fit_weights(model, state_dict, old_grid, "weights")
    if missing or unexpected:
        msg = f"missing: {sorted(missing)}; unexpected: {sorted(unexpected)}"
        if strict:
            raise CheckpointError("weights do not match the model: " + msg)
        log.warning("loaded with mismatches (kept the model's init for missing ones) - %s", msg)
    return model.eval()


def without_head(saved: ModelConfig, state_dict: dict[str, torch.Tensor],
                 overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor], bool]:
    """``(overrides, state_dict, strict)`` for loading weights saved as ``saved`` with ``overrides``.

    ``num_classes=0`` on a classifier keeps its pooling layout (``fc_norm``, as trained) and drops only the
    head, so every other weight is used and the load stays strict (no warnings); the model then returns its
    pooled features (timm's ``num_classes=0``). Any other override relaxes the check (a fresh head, ...)."""
    if overrides.get("num_classes") != 0 or saved.num_classes == 0:
        return overrides, state_dict, not overrides
    overrides = {"use_fc_norm": uses_fc_norm(saved), **overrides}
    sd = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    return overrides, sd, set(overrides) <= {"num_classes", "use_fc_norm"}
