"""Visual tokenizers: train (dVAE / VQ objectives on the shared engine), evaluate, convert DALL-E weights.

The model itself (:class:`Tokenizer`: ``encode`` images in [0, 1] -> ids, ``decode`` ids -> images) lives in
:mod:`beit.models.tokenizer`; this package holds what is done with it.
"""

from ..models.tokenizer import (
    TOKENIZER_PRESETS,
    DVAEConfig,
    Tokenizer,
    get_tokenizer_preset,
    is_tokenizer_file,
    load_tokenizer,
    save_tokenizer,
)
from .dalle import ConversionError, convert_dalle
from .evaluate import evaluate_cmd, evaluate_tokenizer, reconstruction_grid
from .train import (
    RUN_PRESETS,
    DVAEObjective,
    ObjectiveConfig,
    TokenizerTrainConfig,
    build_config,
    build_objective,
    train_tokenizer,
)
from .vq import VQObjective

__all__ = [
    "RUN_PRESETS",
    "TOKENIZER_PRESETS",
    "ConversionError",
    "DVAEConfig",
    "DVAEObjective",
    "ObjectiveConfig",
    "TokenizerTrainConfig",
    "Tokenizer",
    "VQObjective",
    "build_config",
    "build_objective",
    "convert_dalle",
    "evaluate_cmd",
    "evaluate_tokenizer",
    "get_tokenizer_preset",
    "is_tokenizer_file",
    "load_tokenizer",
    "reconstruction_grid",
    "save_tokenizer",
    "train_tokenizer",
]
