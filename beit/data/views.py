"""The two views of one image that BEiT pretraining needs, and the per-sample pretraining transform.

BEiT (arXiv 2106.08254, Sec. 2.1 and 2.5, Appendix): one random resized crop, horizontal flip and colour
jitter, then the crop is resized twice, to the backbone's input size (224, bicubic) and to the tokenizer's
input size (112, Lanczos). Both views show exactly the same content, so the visual token at grid cell
``(i, j)`` describes the patch at ``(i, j)``.

The tokenizer view stays in ``[0, 1]``: ``map_pixels`` belongs to the tokenizer (its ``encode`` takes
``[0, 1]`` images), so a tokenizer trained with another input mapping needs no change here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode

from ..config import ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BeitPretrainTransform",
    "TwoViewTransform",
    "interpolation",
    "random_resized_crop_params",
    "to_rgb_pil",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERP = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
}


def interpolation(name: str, key: str = "interpolation", allowed: Sequence[str] | None = None) -> InterpolationMode:
    """The torchvision mode named ``name``; a name outside ``allowed`` (default: every known one) is a
    ConfigError naming the config ``key``."""
    allowed = list(allowed or _INTERP)
    if name not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {name!r}")
    return _INTERP[name]


def _rand(generator: torch.Generator | None, n: int = 1) -> list[float]:
    return torch.rand(n, generator=generator, dtype=torch.float64).tolist()


def _between(lo: float, hi: float, u: float) -> float:
    return lo + (hi - lo) * u


def random_resized_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random resized crop (Inception-style, as torchvision's RandomResizedCrop).

    Area fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio``; 10 tries, then the
    largest centred crop with the aspect ratio clamped to ``ratio``. Draws only from ``generator``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u_area, u_ratio, u_top, u_left = _rand(generator, 4)
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u_top * (height - h + 1)), height - h)
            left = min(int(u_left * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TwoViewTransform:
    """One crop, two resolutions: ``image -> (patch_view, tokenizer_view)``.

    - ``patch_view``: ``(3, img_size, img_size)`` float32, normalised with ``mean``/``std``
      (``patch_interp``, bicubic as in BEiT).
    - ``tokenizer_view``: ``(3, tokenizer_size, tokenizer_size)`` float32 in ``[0, 1]``
      (``tokenizer_interp``, Lanczos as the official ``second_interpolation``); ``None`` when
      ``tokenizer_size`` is ``None`` (methods without a tokenizer).

    Crop, flip and colour-jitter parameters are drawn once and applied to both views. Each view is cut
    from the original image by one resampling (``resized_crop``), and the jitter is applied to each
    resized view with the same factors (brightness, saturation and hue act per pixel; contrast uses the
    view's mean grey, which the two resolutions share up to resampling error), which is far cheaper than
    jittering the full-resolution crop.

    Inputs: a PIL image (any mode; converted to RGB) or a ``(3, H, W)`` uint8 / ``[0, 1]`` float tensor.
    """

    def __init__(
        self,
        img_size: int = 224,
        tokenizer_size: int | None = 112,
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float | Sequence[float] = 0.4,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        patch_interp: str = "bicubic",
        tokenizer_interp: str = "lanczos",
    ) -> None:
        self.img_size = int(img_size)
        self.tokenizer_size = None if tokenizer_size is None else int(tokenizer_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = float(hflip)
        if isinstance(color_jitter, (int, float)):
            cj = float(color_jitter)
            # brightness, contrast, saturation, hue (BEiT: ColorJitter(0.4, 0.4, 0.4), no hue)
            self.color_jitter = (cj, cj, cj, 0.0)
        else:
            vals = tuple(float(v) for v in color_jitter)
            if len(vals) not in (3, 4):
                raise ValueError(f"color_jitter needs 1, 3 or 4 values, got {color_jitter!r}")
            self.color_jitter = vals + (0.0,) * (4 - len(vals))
        if not 0.0 <= self.color_jitter[3] <= 0.5:
            raise ValueError(f"hue jitter must lie in [0, 0.5], got {self.color_jitter[3]}")
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.patch_interp = interpolation(patch_interp, "patch_interp")
        self.tokenizer_interp = interpolation(tokenizer_interp, "tokenizer_interp")

    def _jitter_ops(self, generator: torch.Generator | None) -> list[tuple[Callable, float]]:
        b, c, s, h = self.color_jitter
        if not (b or c or s or h):
            return []
        order = torch.randperm(4, generator=generator).tolist()
        u = _rand(generator, 4)
        ops: list[tuple[Callable, float]] = []
        for k in order:  # random order of the four adjustments, as torchvision's ColorJitter
            if k == 0 and b:
                ops.append((F.adjust_brightness, _between(max(0.0, 1 - b), 1 + b, u[0])))
            elif k == 1 and c:
                ops.append((F.adjust_contrast, _between(max(0.0, 1 - c), 1 + c, u[1])))
            elif k == 2 and s:
                ops.append((F.adjust_saturation, _between(max(0.0, 1 - s), 1 + s, u[2])))
            elif k == 3 and h:
                ops.append((F.adjust_hue, _between(-h, h, u[3])))
        return ops

    def _view(self, img: Image.Image, box, size: int, interp, flip: bool, ops) -> torch.Tensor:
        top, left, h, w = box
        out = F.resized_crop(img, top, left, h, w, [size, size], interpolation=interp, antialias=True)
        if flip:
            out = F.horizontal_flip(out)
        for fn, factor in ops:
            out = fn(out, factor)
        return F.pil_to_tensor(out).float().div_(255.0)  # (3, size, size) in [0, 1]

    def __call__(
        self, img: Any, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        img = to_rgb_pil(img)
        width, height = img.size
        box = random_resized_crop_params(height, width, self.scale, self.ratio, generator)
        flip = _rand(generator)[0] < self.hflip
        ops = self._jitter_ops(generator)
        patch = self._view(img, box, self.img_size, self.patch_interp, flip, ops)
        patch = F.normalize(patch, self.mean, self.std)
        tok = None
        if self.tokenizer_size is not None:
            tok = self._view(img, box, self.tokenizer_size, self.tokenizer_interp, flip, ops)
        return patch, tok

    def __repr__(self) -> str:
        return (
            f"TwoViewTransform(img_size={self.img_size}, tokenizer_size={self.tokenizer_size}, "
            f"scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, color_jitter={self.color_jitter}, "
            f"patch_interp={self.patch_interp.value}, tokenizer_interp={self.tokenizer_interp.value})"
        )


def to_rgb_pil(img: Any) -> Image.Image:
    if isinstance(img, Image.Image):
        return img if img.mode == "RGB" else img.convert("RGB")
    if isinstance(img, torch.Tensor):
        if img.ndim != 3 or img.shape[0] not in (1, 3):
            raise ValueError(f"expected a (3, H, W) or (1, H, W) image tensor, got shape {tuple(img.shape)}")
        return F.to_pil_image(img).convert("RGB")
    raise TypeError(f"expected a PIL image or a tensor, got {type(img).__name__}")


class BeitPretrainTransform:
    """``image -> {"images": (3,H,W), "tok_images": (3,h,w) in [0,1], "mask": (gh,gw) bool (True = masked)}``.

    All randomness of one sample (crop, flip, jitter, mask) comes from one ``torch.Generator`` seeded by a
    single draw from torch's global RNG, so the engine's per-sample ``torch.manual_seed`` fixes the sample
    exactly (resume) while the transform never disturbs other users of the global RNG beyond that draw.
    ``tok_images`` is left out when the views have no tokenizer size.
    """

    def __init__(self, views: TwoViewTransform, mask_generator: Callable[[torch.Generator], torch.Tensor]):
        self.views = views
        self.mask_generator = mask_generator

    def __call__(self, img: Any) -> dict[str, torch.Tensor]:
        seed = int(torch.randint(0, 2**62, (1,)).item())
        g = torch.Generator().manual_seed(seed)
        patch, tok = self.views(img, generator=g)
        out = {"images": patch, "mask": self.mask_generator(g)}
        if tok is not None:
            out["tok_images"] = tok
        return out

    def __repr__(self) -> str:
        return f"BeitPretrainTransform(views={self.views!r}, mask_generator={self.mask_generator!r})"
