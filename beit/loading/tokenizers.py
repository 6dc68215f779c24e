"""Tokenizers from a path (``--tokenizer``, ``beit.load`` on a tokenizer): a ``tokenizer.safetensors`` file
or a folder holding one (a tokenizer run, a conversion), and the wording of what a wrong path holds instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint_io import CheckpointError, load_weights, safetensors_metadata
from ..config import from_dict
from ..models.tokenizer import (
    TOKENIZER_FILE,
    TOKENIZER_FORMAT,
    Tokenizer,
    TokenizerConfig,
    TokenizerFileError,
    tokenizer_file,
)
from ..models.vqkd import VQKDConfig, VQKDTokenizer
from ..runs import RunDir, describe_kind

__all__ = ["is_tokenizer_file", "load_tokenizer", "not_a_tokenizer"]


def is_tokenizer_file(path: str | Path) -> bool:
    """True if ``path`` (a file or a folder holding tokenizer.safetensors) is a tokenizer written here."""
    path = tokenizer_file(path)
    if not path.is_file():
        return False
    try:
        return safetensors_metadata(path).get("format") == TOKENIZER_FORMAT
    except CheckpointError:  # not a safetensors file at all
        return False


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu") -> Tokenizer | VQKDTokenizer:
    """Load a tokenizer from ``tokenizer.safetensors`` or a folder holding one (a training run, a conversion):
    a :class:`Tokenizer` (dVAE / VQ-VAE) or a :class:`beit.models.vqkd.VQKDTokenizer` (VQ-KD)."""
    path = Path(path)
    if path.is_dir() and not tokenizer_file(path).is_file():
        raise TokenizerFileError(f"no tokenizer at {path / TOKENIZER_FILE}", folder=path)
    path = tokenizer_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}")
    try:
        tensors, meta = load_weights(path)
    except CheckpointError as e:  # unreadable, damaged (its recorded SHA-256 differs) or not finite
        msg = str(e)
        if "not a readable safetensors file" in msg:
            msg = f"{path}: not a safetensors file{msg.split('safetensors file', 1)[-1]}"
        raise TokenizerFileError(msg) from None
    if meta.get("format") != TOKENIZER_FORMAT or not isinstance(meta.get("config"), dict):
        what = "a model (a backbone, not a tokenizer)" if "model_config" in meta or any(
            k.startswith(("blocks.", "encoder.layer.")) for k in tensors) else "not a beit tokenizer"
        raise TokenizerFileError(f"{path}: {what}: no tokenizer config in the safetensors header")
    if meta["config"].get("quantizer") == "vqkd":  # a semantic tokenizer (BEiT v2), same file format
        tok: Tokenizer | VQKDTokenizer = VQKDTokenizer(from_dict(VQKDConfig, meta["config"], prefix="model."))
    else:
        tok = Tokenizer(from_dict(TokenizerConfig, meta["config"], prefix="model."))
    try:
        tok.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit its own config ({str(e).splitlines()[0]})") from None
    return tok.to(device).eval()


def not_a_tokenizer(path: Path) -> str:
    """Why folder ``path`` holds no tokenizer, in the user's terms (a backbone run, an unfinished run...):
    the wording of :class:`beit.models.tokenizer.TokenizerFileError` for a folder."""
    if RunDir.holds_run(path):
        try:
            kind = RunDir(path).kind()
        except CheckpointError:
            kind = "unknown"
        if kind == "tokenizer":
            return f"{path}: tokenizer run without {TOKENIZER_FILE} (its training has not finished)"
        return (f"{path} is {describe_kind(kind)}, not a tokenizer: give a tokenizer run "
                f"(`beit tokenizer train`) or a {TOKENIZER_FILE} file")
    return f"no tokenizer at {path / TOKENIZER_FILE}"
