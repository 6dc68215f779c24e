"""How good is a tokenizer: reconstruction PSNR through the discrete code, and how much of the vocabulary
it uses.

``psnr`` is the mean over images of the per-image PSNR (peak 1) of ``decode(encode(x))`` against ``x``:
the hard code, exactly what BEiT's targets are, not the relaxed code seen in training.
``codebook_usage`` is the share of the vocabulary that occurs at least once over the data set;
``perplexity`` is ``exp(entropy)`` of the code frequencies (``vocab_size`` if all are used equally).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..models.tokenizer import Tokenizer, load_tokenizer
from ..models.vqkd import VQKDTokenizer
from .base import batch_images, psnr
from .vqkd_train import evaluate_vqkd_cmd

log = logging.getLogger("beit")


@torch.no_grad()
def evaluate_tokenizer(
    tok: Tokenizer, data: Dataset | DataLoader | torch.Tensor, batch_size: int = 128
) -> dict[str, float]:
    """``{"psnr", "codebook_usage", "perplexity", "num_images"}`` over a dataset/loader of [0, 1] images.

    ``data``: a DataLoader, a Dataset yielding ``(C, H, W)`` tensors (or ``(tensor, label)``), or a tensor.
    """
    if isinstance(data, torch.Tensor):
        batches: Any = data.split(batch_size)
    elif isinstance(data, DataLoader):
        batches = data
    else:
        batches = DataLoader(data, batch_size=batch_size, shuffle=False)
    was_training = tok.training
    tok.eval()
    device = next(tok.parameters()).device
    counts = torch.zeros(tok.vocab_size, dtype=torch.float64, device=device)
    psnr_sum, n = 0.0, 0
    for batch in batches:
        x = batch_images(batch).to(device).float()
        ids = tok.encode(x)  # (B, h, w)
        rec = tok.decode(ids)  # (B, C, H, W)
        psnr_sum += float(psnr(rec, x).sum())
        n += x.shape[0]
        counts += torch.bincount(ids.flatten(), minlength=tok.vocab_size).double()
    tok.train(was_training)
    if n == 0:
        raise ValueError("evaluate_tokenizer got no images")
    p = counts / counts.sum()
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum()
    return {
        "psnr": psnr_sum / n,
        "codebook_usage": float((counts > 0).double().mean()),
        "perplexity": float(torch.exp(entropy)),
        "num_images": n,
    }


@torch.no_grad()
def reconstruction_grid(tok: Tokenizer, images: torch.Tensor, path: str | Path) -> Path:
    """PNG with the originals (top row) above their reconstructions through the code (bottom row)."""
    from torchvision.utils import save_image

    was_training = tok.training
    tok.eval()
    images = images.float()
    rec = tok.reconstruct(images)
    tok.train(was_training)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat([images.cpu(), rec.cpu()]), path, nrow=len(images), padding=2, pad_value=1.0)
    return path


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
    from ..config import ConfigError
    from .train import build_dataset

    if batch_size < 1 or limit < 0:
        raise ConfigError(f"--batch-size must be >= 1 and --limit >= 0, got {batch_size} and {limit}")
    tok = load_tokenizer(tokenizer, device=device)
    if isinstance(tok, VQKDTokenizer):
        return evaluate_vqkd_cmd(tokenizer, data_dir, teacher=teacher, limit=limit, batch_size=batch_size,
                                 device=device)
    ds = build_dataset(data_dir, tok.cfg.img_size, train=False, limit=limit)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    res = evaluate_tokenizer(tok, loader)
    if grid is not None:
        imgs = torch.stack([ds[i] for i in range(min(8, len(ds)))])  # type: ignore[arg-type]
        reconstruction_grid(tok, imgs.to(device), grid)
    if out_json is not None:
        Path(out_json).write_text(json.dumps(res, indent=2) + "\n")
    return res


__all__ = ["evaluate_cmd", "evaluate_tokenizer", "reconstruction_grid"]
