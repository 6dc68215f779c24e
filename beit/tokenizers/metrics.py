"""How good is a tokenizer: reconstruction PSNR through the discrete code, and how much of the vocabulary
it uses. Shared by the objectives' evaluation (:mod:`.base`) and ``beit tokenizer eval`` (:mod:`.evaluate`).

``psnr`` is the mean over images of the per-image PSNR (peak 1) of ``decode(encode(x))`` against ``x``:
the hard code, exactly what BEiT's targets are, not the relaxed code seen in training.
``codebook_usage`` is the share of the vocabulary that occurs at least once over the data set;
``perplexity`` is ``exp(entropy)`` of the code frequencies (``vocab_size`` if all are used equally).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.folder import DropUnreadable
from ..models.tokenizer import Tokenizer

__all__ = ["batch_images", "code_perplexity", "evaluate_tokenizer", "psnr", "reconstruction_grid"]


def batch_images(batch: Any) -> torch.Tensor:
    """The image tensor of a batch: a tensor, ``(images, labels)`` or a dict with ``image(s)``."""
    if torch.is_tensor(batch):
        return batch
    if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
        return batch[0]
    if isinstance(batch, dict):
        for k in ("images", "image", "x"):
            if k in batch:
                return batch[k]
    raise TypeError(f"cannot find the images in a batch of type {type(batch).__name__}")


@torch.no_grad()
def psnr(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of images in [0, 1] (peak 1), per image; MSE floored at 1e-10 (100 dB)."""
    mse = (rec.float() - x.float()).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp(min=1e-10))


@torch.no_grad()
def code_perplexity(ids: torch.Tensor, vocab_size: int) -> float:
    """exp(entropy) of the empirical code distribution: 1 = one code used, ``vocab_size`` = all equally."""
    p = torch.bincount(ids.flatten(), minlength=vocab_size).double()
    p = p / p.sum().clamp(min=1)
    return float(torch.exp(-(p * torch.log(p.clamp(min=1e-30))).sum()))


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
        batches = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=DropUnreadable())
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
