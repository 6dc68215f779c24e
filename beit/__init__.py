"""beit: BERT-style self-supervised pretraining of vision transformers (BEiT, MAE, iBOT).

Train a visual tokenizer, pretrain, fine-tune, probe, segment, look inside, and move weights to and from
HF transformers and timm. ``beit.load(path)`` reads every kind of weights the project knows.
"""

from .api import load
from .config import ModelConfig
from .models import VisionTransformer, create_model

__version__ = "0.1.0"
__all__ = ["ModelConfig", "VisionTransformer", "__version__", "create_model", "load"]
