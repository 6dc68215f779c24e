"""The backbone and its presets (the dVAE lives in :mod:`beit.models.tokenizer`)."""

from beit.models.presets import PRESETS, create_model, get_preset
from beit.models.vit import VisionTransformer

__all__ = ["PRESETS", "VisionTransformer", "create_model", "get_preset"]
