"""Visual tokenizers: train (Gumbel dVAE / VQ-VAE / VQ-KD objectives on the shared engine), evaluate, convert
DALL-E and BEiT v2 weights.

The model itself (:class:`Tokenizer`: ``encode`` images in [0, 1] -> ids, ``decode`` ids -> images) lives in
:mod:`beit.models.tokenizer`; this package holds what is done with it: :mod:`.base` (what every objective
shares), :mod:`.gumbel`, :mod:`.vq` (one objective each), :mod:`.metrics` (PSNR, codebook use),
:mod:`.train` (the one entry of every objective's run), :mod:`.evaluate` (a saved tokenizer on a folder), :mod:`.dalle`; the dataset is
:mod:`beit.data.tokenizer`. The semantic tokenizer of BEiT v2: :mod:`.vqkd` (objective, teacher),
:mod:`.vqkd_train` (its config and run), :mod:`.beit2` (official checkpoints). A saved tokenizer is read back
through the one way in for weights: :func:`beit.load` / :func:`beit.loading.load_tokenizer`.
"""

from ..models.tokenizer import (
    TOKENIZER_PRESETS,
    Tokenizer,
    TokenizerConfig,
    get_tokenizer_preset,
    save_tokenizer,
)
from .base import ObjectiveConfig, TokenizerObjective
from .beit2 import convert_beit2
from .dalle import ConversionError, convert_dalle
from .evaluate import evaluate_cmd, reconstruction_grid
from .gumbel import GumbelObjective
from .metrics import evaluate_tokenizer
from .train import (
    OBJECTIVES,
    RUN_PRESETS,
    TokenizerTrainConfig,
    build_config,
    build_objective,
    train_tokenizer,
)
from .vq import VQObjective
from .vqkd import Teacher, VQKDObjective, VQKDObjectiveConfig, evaluate_vqkd
from .vqkd_train import VQKD_RUN_PRESETS, VQKDTrainConfig, build_vqkd_config, evaluate_vqkd_cmd

__all__ = [
    "OBJECTIVES",
    "RUN_PRESETS",
    "TOKENIZER_PRESETS",
    "ConversionError",
    "GumbelObjective",
    "ObjectiveConfig",
    "Tokenizer",
    "TokenizerConfig",
    "TokenizerObjective",
    "TokenizerTrainConfig",
    "Teacher",
    "VQKDObjective",
    "VQKDObjectiveConfig",
    "VQKDTrainConfig",
    "VQKD_RUN_PRESETS",
    "VQObjective",
    "build_config",
    "build_objective",
    "build_vqkd_config",
    "convert_beit2",
    "convert_dalle",
    "evaluate_cmd",
    "evaluate_tokenizer",
    "evaluate_vqkd",
    "evaluate_vqkd_cmd",
    "get_tokenizer_preset",
    "reconstruction_grid",
    "save_tokenizer",
    "train_tokenizer",
]
