"""The one way in for weights: everything that turns a path into a model, a backbone or a tokenizer.

``beit.load``, ``--init`` (fine-tuning, segmentation, probes), ``--tokenizer`` (BEiT pretraining), ``--teacher``
(VQ-KD, ``beit.target=teacher``), resuming a run, and every ``beit show`` / ``probe`` / ``segment eval`` load go
through this package; no other module of ``beit`` opens a checkpoint or a foreign weights file
(``tests/meta/test_loading_gate.py`` checks it). The file formats themselves (safetensors with their
SHA-256, pickles read as tensors only) are :mod:`beit.checkpoint_io`; the key mappings to and from HF and
timm are :mod:`beit.interop`; the position-table geometry is :mod:`beit.models.positions`. Lower layers raise
plain typed errors; this package words what a wrong path holds (:func:`not_a_tokenizer`, ...).

- :mod:`~beit.loading.checkpoints`: run folders of this project (a run's backbone, its whole trained module,
  a checkpoint to resume from);
- :mod:`~beit.loading.foreign`: HF folders, timm files and folders, official ``.pth`` files;
- :mod:`~beit.loading.tokenizers`: ``tokenizer.safetensors`` and the folders holding one;
- :mod:`~beit.loading.backbones`: the backbone of a downstream model (``--init``);
- :mod:`~beit.loading.weights`: fitting a state dict into a model (resized position tables, new heads).

Nothing is unpickled: safetensors, JSON and YAML only; ``.pth``/``.bin`` files go through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint_io import CheckpointError
from ..preprocess import pretrained_cfg_of, tokenizer_pretrained_cfg
from ..runs import RunDir
from .backbones import (
    adopt_architecture,
    backbone_state,
    build_backbone,
    checkpoint_model_config,
    init_from,
    resumed_model_config,
)
from .checkpoints import load_run, read_checkpoint, run_backbone_state, run_weights
from .foreign import load_any, read_official
from .tokenizers import is_tokenizer_file, load_tokenizer, not_a_tokenizer
from .weights import adapt_state_dict, build_and_load

__all__ = ["adapt_state_dict", "adopt_architecture", "backbone_state", "build_and_load", "build_backbone",
           "checkpoint_model_config", "init_from", "is_tokenizer_file", "load", "load_any", "load_run",
           "load_tokenizer", "not_a_tokenizer", "read_checkpoint", "read_official", "resumed_model_config",
           "run_backbone_state", "run_weights"]


def load(path: str | Path, *, which: str | None = None, device: str | torch.device = "cpu", **overrides: Any):
    """Load a model or tokenizer from ``path``; ``overrides`` change ``ModelConfig`` fields (e.g.
    ``img_size=64`` resizes position tables, ``num_classes=10`` adds a fresh head, ``num_classes=0`` on a
    classifier drops its head: ``model(images)`` then gives the pooled ``(B, D)`` features). ``which`` picks
    one of the named backbones of a run (iBOT: ``teacher``, the default, or ``student``).

    - a tokenizer (``tokenizer.safetensors`` or a folder/run holding one) -> :class:`beit.models.tokenizer.Tokenizer`;
    - a run directory of this project (pretraining, fine-tuning, ...) or one of its checkpoint directories
      -> :class:`beit.models.vit.VisionTransformer` with the run's heads (a BEiT pretraining run gives the
      masked-image-modeling model; a fine-tuning run the classifier);
    - an HF transformers folder, a timm state dict, an official BEiT checkpoint -> ``VisionTransformer``.

    A model carries ``model.pretrained_cfg`` (input size, mean/std, crop, class names: see
    :mod:`beit.preprocess`); :func:`beit.transform_for` turns it into its evaluation transform."""
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
        model = load_any(p, **overrides)[1]
    model.pretrained_cfg = pretrained_cfg_of(p, model)  # what transform_for(model) feeds it
    return model.to(device)
