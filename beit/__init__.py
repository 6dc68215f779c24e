"""beit: BERT-style self-supervised pretraining of vision transformers (BEiT, MAE, iBOT).

Train a visual tokenizer, pretrain, fine-tune, probe, segment, look inside, and move weights to and from
HF transformers and timm. ``beit.load(path)`` reads every kind of weights the project knows.

The names below are imported on first use (PEP 562): ``import beit`` alone, which every ``beit`` command does
before it parses its flags, does not import torch, so ``beit --help`` and ``beit presets`` answer at once.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "load": "beit.api",
    "ModelConfig": "beit.config",
    "VisionTransformer": "beit.models",
    "create_model": "beit.models",
}

__all__ = ["ModelConfig", "VisionTransformer", "__version__", "create_model", "load"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports them
    from .api import load
    from .config import ModelConfig
    from .models import VisionTransformer, create_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # imported once
        return value
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # ``beit.config`` etc. after a bare ``import beit``
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'beit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
