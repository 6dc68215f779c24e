"""Pictures' pixels: loading an image for a model, (un)normalising, greying out masked patches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..config import image_hw
from ..data.views import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["masked_view", "normalize", "pixel_mask", "prepare_image", "unnormalize"]


def prepare_image(image: Any, size: int | tuple[int, int]) -> torch.Tensor:
    """A path, PIL image or ``(3, H, W)`` tensor -> ``(3, h, w)`` float in [0, 1] for ``size`` = ``h`` (square)
    or ``(h, w)``: resized (bicubic) to the smallest size that covers ``(h, w)`` with the aspect ratio kept
    (for a square: the short side to ``h``), then a center crop."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms.v2 import InterpolationMode

    from ..data.folder import DataError, load_image

    if isinstance(image, (str, Path)):
        img = load_image(image)
        if img is None:
            raise DataError(f"cannot read the image {image}")
        image = img
    if isinstance(image, Image.Image):
        x = TF.pil_to_tensor(image.convert("RGB"))
    elif torch.is_tensor(image):
        x = image if image.dtype == torch.uint8 else (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    else:
        raise TypeError(f"expected an image path, a PIL image or a tensor, got {type(image).__name__}")
    h, w = image_hw(size)
    if h == w:
        x = TF.resize(x, h, interpolation=InterpolationMode.BICUBIC, antialias=True)
    else:
        scale = max(h / x.shape[-2], w / x.shape[-1])
        cover = [max(h, round(x.shape[-2] * scale)), max(w, round(x.shape[-1] * scale))]
        x = TF.resize(x, cover, interpolation=InterpolationMode.BICUBIC, antialias=True)
    x = TF.center_crop(x, [h, w])
    return x.float() / 255.0


def normalize(x01: torch.Tensor) -> torch.Tensor:
    """``(..., 3, H, W)`` in [0, 1] -> normalised with the ImageNet mean/std (the models' input)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x01.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x01.device).view(-1, 1, 1)
    return (x01 - mean) / std


def unnormalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """``(B, 3, H, W)`` normalised -> ``[0, 1]``."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)


def pixel_mask(mask: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
    """``(B, h, w)`` patch mask (True = masked) -> ``(B, 1, H, W)`` bool, each patch spread over its pixels."""
    B = mask.shape[0]
    return F.interpolate(mask.float().view(B, 1, *mask.shape[-2:]), size=tuple(hw), mode="nearest").bool()


def masked_view(images01: torch.Tensor, mask: torch.Tensor, shade: float = 0.5) -> torch.Tensor:
    """Grey out the masked patches of ``images01`` (B, 3, H, W); ``mask`` (B, h, w) bool, True = masked."""
    m = pixel_mask(mask, images01.shape[-2:]).to(images01.dtype)  # (B, 1, H, W)
    return images01 * (1 - m) + shade * m
