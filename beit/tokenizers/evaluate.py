"""A saved tokenizer on a folder of images (``beit tokenizer eval``): its metrics (:mod:`.metrics`) and a
reconstruction grid.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..config import ConfigError
from ..data.folder import DropUnreadable
from ..data.tokenizer import build_dataset
from ..loading import load_tokenizer
from ..models.vqkd import VQKDTokenizer
from .metrics import evaluate_tokenizer, reconstruction_grid
from .vqkd_train import evaluate_vqkd_cmd

log = logging.getLogger("beit")


def evaluate_cmd(
    tokenizer: str | Path,
    data_dir: str | Path,
    *,
    limit: int = 0,
    batch_size: int = 128,
    grid: str | Path | None = None,
    out_json: str | Path | None = None,
    device: str = "cpu",
    num_workers: int = 0,
    teacher: str | None = None,
) -> dict[str, float]:
    """Evaluate a saved tokenizer (a run dir or ``tokenizer.safetensors``) on a folder of images.

    A VQ-KD tokenizer has no pixels to reconstruct: it reports codebook usage, perplexity and the cosine to
    its teacher's features (``teacher``, default: the one its run recorded; :func:`evaluate_vqkd_cmd`).

    Images are resized (shorter side) and centre-cropped to the tokenizer's size. Optionally writes a
    reconstruction grid PNG of the first 8 images and the numbers as JSON.
    """
    if batch_size < 1 or limit < 0:
        raise ConfigError(f"--batch-size must be >= 1 and --limit >= 0, got {batch_size} and {limit}")
    tok = load_tokenizer(tokenizer, device=device)
    if isinstance(tok, VQKDTokenizer):
        return evaluate_vqkd_cmd(tokenizer, data_dir, teacher=teacher, limit=limit, batch_size=batch_size,
                                 device=device)
    ds = build_dataset(data_dir, tok.cfg.img_size, train=False, limit=limit)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=DropUnreadable())  # an image that fails to decode is left out
    res = evaluate_tokenizer(tok, loader)
    if grid is not None:
        imgs = torch.stack([ds[i] for i in range(min(8, len(ds)))])  # type: ignore[arg-type]
        reconstruction_grid(tok, imgs.to(device), grid)
    if out_json is not None:
        Path(out_json).write_text(json.dumps(res, indent=2) + "\n")
    return res


__all__ = ["evaluate_cmd", "evaluate_tokenizer", "reconstruction_grid"]
