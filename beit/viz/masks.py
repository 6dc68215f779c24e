"""A grid of training views with their masks: what the model is asked to predict."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.views import IMAGENET_MEAN, IMAGENET_STD


def unnormalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """``(B, 3, H, W)`` normalised -> ``[0, 1]``."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)


def masked_view(images01: torch.Tensor, mask: torch.Tensor, shade: float = 0.5) -> torch.Tensor:
    """Grey out the masked patches of ``images01`` (B, 3, H, W); ``mask`` (B, h, w) bool, True = masked."""
    B, _, H, W = images01.shape
    m = F.interpolate(mask.float().view(B, 1, *mask.shape[-2:]), size=(H, W), mode="nearest")  # (B, 1, H, W)
    return images01 * (1 - m) + shade * m


def save_mask_grid(dataset, path: str | Path, n: int = 8, seed: int = 0, upscale: int = 4) -> Path | None:
    """Row 1: patch views; row 2: the same views with masked patches greyed. ``dataset[i]`` must be a dict
    with ``images`` and ``mask`` (the pretraining transforms' output); otherwise nothing is drawn."""
    from torchvision.utils import save_image

    n = min(n, len(dataset))
    views, masks = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(n):
            s = dataset[i]
            if not (isinstance(s, dict) and "images" in s and "mask" in s):
                return None
            img, mask = s["images"], s["mask"]
            if img.dim() == 4:  # several views: take the first
                img, mask = img[0], mask[0]
            views.append(img)
            masks.append(mask.reshape(-1, *mask.shape[-2:])[0] if mask.dim() > 2 else mask)
    imgs = unnormalize(torch.stack(views))
    grid = torch.cat([imgs, masked_view(imgs, torch.stack(masks))])
    if upscale > 1:
        grid = F.interpolate(grid, scale_factor=upscale, mode="nearest")
    path = Path(path)
    save_image(grid, path, nrow=n, padding=2, pad_value=1.0)
    return path
