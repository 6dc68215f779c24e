"""beit: BERT-style self-supervised pretraining of vision transformers (BEiT, MAE, iBOT).

Train a visual tokenizer, pretrain, fine-tune, probe, segment, look inside, and move weights to and from
HF transformers and timm. ``beit.load(path)`` reads every kind of weights the project knows;
``beit.transform_for(model)`` is the input transform the loaded model expects.

Training from Python (:mod:`beit.workflows`): ``beit.pretrain``, ``beit.finetune``, ``beit.probe``,
``beit.segment``, ``beit.train_tokenizer``, ``beit.embed``, with keyword arguments, a folder or a
``torch.utils.data.Dataset`` as data, each returning a :class:`beit.workflows.RunResult`.

The names below are imported on first use (PEP 562): ``import beit`` alone imports neither torch nor the
training code, so scripts and the command line start at once.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .version import __version__

# public name -> the module that defines it
_LAZY = {
    "load": "beit.loading",
    "transform_for": "beit.preprocess",
    "ModelConfig": "beit.config",
    "VisionTransformer": "beit.models",
    "create_model": "beit.models",
    "RunResult": "beit.workflows",
    "embed": "beit.workflows",
    "finetune": "beit.workflows",
    "pretrain": "beit.workflows",
    "probe": "beit.workflows",
    "segment": "beit.workflows",
    "train_tokenizer": "beit.workflows",
}

__all__ = ["ModelConfig", "RunResult", "VisionTransformer", "__version__", "create_model", "embed", "finetune", "load",
           "pretrain", "probe", "segment", "train_tokenizer", "transform_for"]

if TYPE_CHECKING:  # for type checkers, IDEs and pdoc; at run time __getattr__ imports them
    from .config import ModelConfig
    from .loading import load
    from .models import VisionTransformer, create_model
    from .preprocess import transform_for
    from .workflows import RunResult, embed, finetune, pretrain, probe, segment, train_tokenizer


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
