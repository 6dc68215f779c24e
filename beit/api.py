"""``beit.load``: one call for every kind of weights this project reads.

- a tokenizer (``tokenizer.safetensors`` or a folder/run holding one) -> :class:`beit.models.tokenizer.Tokenizer`;
- a run directory of this project (pretraining, fine-tuning, ...) or one of its checkpoint directories
  -> :class:`beit.models.vit.VisionTransformer` with the run's heads (a BEiT pretraining run gives the
  masked-image-modeling model; a fine-tuning run the classifier);
- an HF transformers folder, a timm state dict, an official BEiT checkpoint -> ``VisionTransformer``.

Nothing is unpickled: safetensors, JSON and YAML only; ``.pth``/``.bin`` files go through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from . import interop
from .checkpoint import CheckpointError
from .preprocess import pretrained_cfg_of, tokenizer_pretrained_cfg, transform_for
from .runs import RunDir, backbone_state, init_from, load_run, run_backbone_state, run_config

log = logging.getLogger("beit")

__all__ = ["backbone_state", "init_from", "load", "load_run", "run_backbone_state", "run_config", "transform_for"]


def load(path: str | Path, *, which: str | None = None, device: str | torch.device = "cpu", **overrides: Any):
    """Load a model or tokenizer from ``path``; ``overrides`` change ``ModelConfig`` fields (e.g.
    ``img_size=64`` resizes position tables, ``num_classes=10`` adds a fresh head, ``num_classes=0`` on a
    classifier drops its head: ``model(images)`` then gives the pooled ``(B, D)`` features). ``which`` picks
    one of the named backbones of a run (iBOT: ``teacher``, the default, or ``student``).

    A model carries ``model.pretrained_cfg`` (input size, mean/std, crop, class names: see
    :mod:`beit.preprocess`); :func:`beit.transform_for` turns it into its evaluation transform."""
    from .models.tokenizer import is_tokenizer_file, load_tokenizer

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if is_tokenizer_file(p):
        tok = load_tokenizer(p, device=device)
        tok.pretrained_cfg = tokenizer_pretrained_cfg(tok)  # transform_for(tok): [0, 1] images at its size
        return tok
    if RunDir.holds_run(p):
        if RunDir(p).kind() == "tokenizer":
            raise CheckpointError(f"{p}: tokenizer run without tokenizer.safetensors (its training has not finished)")
        model = load_run(p, which=which, **overrides)
    else:
        model = interop.load_any(p, **overrides)[1]
    model.pretrained_cfg = pretrained_cfg_of(p, model)  # what transform_for(model) feeds it
    return model.to(device)
