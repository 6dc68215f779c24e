"""Self-attention maps: where the [CLS] token of one layer looks (BEiT Fig. 2; DINO-style overlays).

>>> from beit.viz.attention import show_attention
>>> show_attention("runs/pretrain", "cat.jpg", "attention.png", layer=-1)

``cls_attention`` gives the numbers: ``(heads, h, w)`` softmax weights of [CLS] -> each patch (one
row of the attention matrix without its [CLS] column, so each head's map sums to at most 1).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import image_hw
from ..loading import load
from .images import normalize, prepare_image

log = logging.getLogger("beit")

__all__ = ["cls_attention", "load_backbone", "normalize", "prepare_image", "show_attention"]


def load_backbone(init: Any, img_size: int | tuple[int, int] | None = None):
    """A :class:`VisionTransformer` from a model or anything ``beit.load`` reads; ``img_size`` (a side or
    ``(height, width)``) loads a checkpoint at another resolution, its position tables resized."""
    from ..config import ConfigError
    from ..models.vit import VisionTransformer

    if isinstance(init, VisionTransformer):
        if img_size is not None and image_hw(img_size) != init.patch_embed.img_hw:
            raise ConfigError("img_size applies to a checkpoint path, not to a model object")
        model = init
    else:
        model = load(init) if img_size is None else load(init, img_size=img_size)
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"{init}: not a vision transformer checkpoint (a tokenizer?)")
    return model.eval()


@torch.no_grad()
def cls_attention(model, image: Any, layer: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """``((heads, h, w) attention of [CLS] to every patch in block ``layer``, (3, H, W) image in [0, 1])``."""
    model = load_backbone(model)
    x01 = prepare_image(image, model.patch_embed.img_hw)
    device = next(model.parameters()).device
    attn = model.get_attention(normalize(x01)[None].to(device), layer)  # (1, heads, 1+N, 1+N)
    h, w = model.grid_size
    maps = attn[0, :, 0, 1:].float().reshape(-1, h, w).cpu()  # (heads, h, w)
    return maps, x01


def _overlay(ax, img: np.ndarray, amap: torch.Tensor, title: str) -> None:
    up = F.interpolate(amap[None, None], size=img.shape[:2], mode="nearest")[0, 0].numpy()
    lo, hi = float(up.min()), float(up.max())
    up = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
    ax.imshow(img)
    ax.imshow(up, cmap="inferno", alpha=0.6, vmin=0.0, vmax=1.0)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def show_attention(init: Any, image: Any, out: str | Path, layer: int = -1, dpi: int = 120,
                   img_size: int | tuple[int, int] | None = None) -> Path:
    """Save a PNG: the image, the head-mean [CLS] attention and one panel per head, overlaid on the image.

    ``init``: a model or anything ``beit.load`` reads; ``layer``: block index (negative from the end);
    ``img_size``: a side or ``(height, width)`` to run at (default: the checkpoint's), e.g. (120, 160)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = load_backbone(init, img_size)
    maps, x01 = cls_attention(model, image, layer)
    heads = maps.shape[0]
    img = x01.permute(1, 2, 0).numpy()
    cols = min(heads + 2, 8)
    rows = -(-(heads + 2) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(img)
    axes.flat[0].set_title("image", fontsize=8)
    _overlay(axes.flat[1], img, maps.mean(0), "mean of heads")
    for i in range(heads):
        _overlay(axes.flat[i + 2], img, maps[i], f"head {i}")
    depth = model.num_layers
    fig.suptitle(f"[CLS] attention, block {layer % depth} (0-based) of {depth}", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
