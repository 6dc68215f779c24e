"""beit: BERT-style self-supervised pretraining of vision transformers (BEiT, MAE, iBOT).

Train a visual tokenizer, pretrain, fine-tune, probe, segment, look inside, and move weights to and from
HF transformers and timm. ``beit.load(path)`` reads every kind of weights the project knows.
"""

import importlib

from .api import load, transform_for
from .config import ModelConfig
from .models import VisionTransformer, create_model

__version__ = "0.1.0"
__all__ = ["ModelConfig", "RunResult", "VisionTransformer", "__version__", "create_model", "embed", "finetune", "load",
           "pretrain", "probe", "segment", "train_tokenizer", "transform_for"]

# The training entry points (beit.workflows) load the tasks, the engine and their plotting: only on first use,
# so ``import beit`` for ``beit.load`` stays as light as it was.
_WORKFLOWS = frozenset({"RunResult", "embed", "finetune", "pretrain", "probe", "segment", "train_tokenizer"})


def __getattr__(name: str):
    if name in _WORKFLOWS:
        return getattr(importlib.import_module(".workflows", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
