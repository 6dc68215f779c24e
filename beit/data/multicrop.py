"""Multi-crop augmentation of DINO / iBOT (Caron et al. 2021, arXiv 2104.14294; Zhou et al. 2021,
arXiv 2111.07832, ``DataAugmentationiBOT`` in the official ``main_ibot.py``).

Per image: ``n_global`` global crops at the model's resolution and ``n_local`` local crops at a smaller one,
each an independent random resized crop (bicubic) followed by

- horizontal flip (p 0.5), colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) applied with
  p 0.8, grayscale with p 0.2 (all crops);
- Gaussian blur: always on the first global crop, p 0.1 on the other global crops, p 0.5 on local crops;
  sigma uniform in [0.1, 2.0] pixels;
- solarisation (threshold 128) with p 0.2 on the global crops after the first;
- ``ToTensor`` + ImageNet normalisation.

The recipe's scales: global ``(0.14, 1)`` without local crops (the official default), ``(0.25, 1)`` with
local crops ``(0.05, 0.25)`` (the released ViT-S/16 command, 10 local crops of 96 px).

The blur uses torchvision's ``GaussianBlur`` whose kernel must be given: we take an odd kernel of about a
tenth of the crop side (SimCLR / BYOL), at least 3; DINO's PIL blur uses an unbounded kernel, which differs
only in the far tails of the Gaussian.

All randomness comes from torch's global RNG, which the engine seeds per sample (exact resume).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.transforms import v2 as T

from .views import IMAGENET_MEAN, IMAGENET_STD, to_rgb_pil

__all__ = ["MultiCropTransform", "blur_kernel_size"]


def blur_kernel_size(size: int) -> int:
    """Odd kernel side of about 10% of ``size`` (23 at 224 px), at least 3."""
    k = max(3, int(round(0.1 * size)))
    return k if k % 2 else k + 1


def _photometric(size: int, blur_p: float, solarize_p: float, mean, std) -> T.Compose:
    ops: list[Any] = [
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))], p=blur_p))
    if solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=128, p=solarize_p))
    ops += [T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    return T.Compose(ops)


class MultiCropTransform:
    """``image -> (global_crops (G, 3, S, S), local_crops (L, 3, s, s) or None)``, float32, normalised."""

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_global: int = 2,
        n_local: int = 0,
        global_scale: tuple[float, float] = (0.14, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if n_global < 1:
            raise ValueError(f"n_global must be >= 1, got {n_global}")
        self.global_size, self.local_size = int(global_size), int(local_size)
        self.n_global, self.n_local = int(n_global), int(n_local)
        bicubic = T.InterpolationMode.BICUBIC

        def crop(size: int, scale) -> T.RandomResizedCrop:
            return T.RandomResizedCrop(size, scale=tuple(scale), interpolation=bicubic, antialias=True)

        self.global1 = T.Compose([crop(global_size, global_scale),
                                  _photometric(global_size, 1.0, 0.0, mean, std)])
        self.global2 = T.Compose([crop(global_size, global_scale),
                                  _photometric(global_size, 0.1, 0.2, mean, std)])
        self.local = T.Compose([crop(local_size, local_scale), _photometric(local_size, 0.5, 0.0, mean, std)])

    def __call__(self, img: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        img = to_rgb_pil(img)
        globals_ = [self.global1(img)] + [self.global2(img) for _ in range(self.n_global - 1)]
        locals_ = [self.local(img) for _ in range(self.n_local)]
        return torch.stack(globals_), (torch.stack(locals_) if locals_ else None)

    def __repr__(self) -> str:
        return (f"MultiCropTransform(global {self.n_global}x{self.global_size}px, "
                f"local {self.n_local}x{self.local_size}px)")
