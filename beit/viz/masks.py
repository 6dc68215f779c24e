"""A grid of training views with their masks: what the model is asked to predict."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .images import masked_view, unnormalize


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
