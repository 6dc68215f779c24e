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

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode

from ..config import ConfigError, image_hw

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BeitPretrainTransform",
    "DeviceCollate",
    "TwoViewTransform",
    "check_fixed_normalisation",
    "eval_transform",
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


def check_fixed_normalisation(mean: Sequence[float], std: Sequence[float], section: str) -> None:
    """``section.mean``/``section.std`` record the normalisation of a task whose transforms use the ImageNet
    statistics only (pretraining views, segmentation): any other value is refused rather than recorded
    without being applied."""
    if [round(float(v), 6) for v in mean] != list(IMAGENET_MEAN) or [round(float(v), 6) for v in std] != list(IMAGENET_STD):
        raise ConfigError(f"{section}.mean/{section}.std: these transforms normalise with the ImageNet statistics "
                          f"mean={list(IMAGENET_MEAN)} std={list(IMAGENET_STD)} only; got mean={list(mean)} std={list(std)}")


def eval_transform(img_size: int | Sequence[int], crop_pct: float = 1.0, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD, interp: str = "bicubic"):
    """The evaluation transform, one copy for every caller (fine-tuning's validation, probes, ``beit embed``,
    :func:`beit.transform_for`): PIL image (any mode) -> RGB -> resize the short side to
    ``floor(img_size / crop_pct)`` -> centre crop ``img_size`` -> ``[0, 1]`` -> normalise by ``mean``/``std``.
    A rectangular ``(height, width)`` size is resized to ``floor(side / crop_pct)`` per side, then cropped.
    (timm's ``create_transform(is_training=False)`` and HF's BeitImageProcessor with ``shortest_edge`` do the same.)"""
    from torchvision import transforms as T

    hw = image_hw(img_size)
    if hw[0] == hw[1]:
        resize: int | tuple[int, int] = int(math.floor(hw[0] / crop_pct + 1e-6))
    else:
        resize = (int(math.floor(hw[0] / crop_pct + 1e-6)), int(math.floor(hw[1] / crop_pct + 1e-6)))
    return T.Compose([
        to_rgb_pil,
        T.Resize(resize, interpolation=interpolation(interp, "interpolation")),
        T.CenterCrop(hw),
        T.ToTensor(),
        T.Normalize(tuple(mean), tuple(std)),
    ])


def _rand(generator: torch.Generator | None, n: int = 1) -> list[float]:
    return torch.rand(n, generator=generator, dtype=torch.float64).tolist()


def _between(lo: float, hi: float, u: float) -> float:
    return lo + (hi - lo) * u


_GRAY = torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601-2 luma, as torchvision


def color_jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """ColorJitter on a batch ``x (B, 3, H, W)`` in ``[0, 1]``, each image with its own order and factors
    (``params (B, 8)``, see :meth:`TwoViewTransform._jitter_params`), as torchvision's tensor kernels:
    brightness ``f x``; contrast: blend with the image's mean grey; saturation: blend with its grey image;
    hue: shift in HSV. All in float (no rounding to 8 bits between the steps). Where an adjustment is not
    at this position for an image, its factor is the identity, so each step is one batched blend."""
    order, f = params[:, :4].long(), params[:, 4:].to(x)
    gray_w = _GRAY.to(x)
    for pos in range(4):
        op = order[:, pos].view(-1, 1, 1, 1)  # which adjustment each image makes at this position
        factor = f.gather(1, order[:, pos:pos + 1].clamp(max=2)).view(-1, 1, 1, 1)
        factor = torch.where(op == 3, torch.ones_like(factor), factor)  # hue: below
        if not bool((factor == 1).all()):
            gray = (x * gray_w).sum(1, keepdim=True)  # (B, 1, H, W)
            ref = torch.where(op == 2, gray, torch.where(op == 1, gray.mean((2, 3), keepdim=True), 0.0))
            x = x.mul_(factor).add_(ref.mul_(1 - factor)).clamp_(0.0, 1.0)  # blend(x, ref, factor)
        for i in torch.nonzero((order[:, pos] == 3) & (f[:, 3] != 0)).flatten().tolist():  # hue: rare
            x[i] = F.adjust_hue(x[i], float(f[i, 3]))
    return x


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

    - ``patch_view``: ``(3, img_size, img_size)`` float32 (``img_size`` may be ``(height, width)``: a
      rectangle, the crop's aspect-ratio range then centred on ``width / height``), normalised with
      ``mean``/``std`` (``patch_interp``, bicubic as in BEiT).
    - ``tokenizer_view``: ``(3, tokenizer_size, tokenizer_size)`` (or ``(height, width)``) float32 in ``[0, 1]``
      (``tokenizer_interp``, Lanczos as the official ``second_interpolation``); ``None`` when
      ``tokenizer_size`` is ``None`` (methods without a tokenizer).

    Crop, flip and colour-jitter parameters are drawn once and applied to both views. Each view is cut
    from the original image by one resampling (``resized_crop``), and the jitter is applied to each
    resized view with the same factors (brightness, saturation and hue act per pixel; contrast uses the
    view's mean grey, which the two resolutions share up to resampling error), which is far cheaper than
    jittering the full-resolution crop.

    Inputs: a PIL image (any mode; converted to RGB) or a ``(3, H, W)`` uint8 / ``[0, 1]`` float tensor (through
    PIL, so both give the same numbers; with ``resize="tensor"`` a uint8 tensor is resampled as a tensor).
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
        resize: str = "pil",
    ) -> None:
        self.img_size, self.tokenizer_size = img_size, tokenizer_size
        self.img_hw = image_hw(img_size)  # (height, width): rectangles too
        self.tok_hw = None if tokenizer_size is None else image_hw(tokenizer_size)
        self.scale = (float(scale[0]), float(scale[1]))
        aspect = self.img_hw[1] / self.img_hw[0]  # crops keep the views' aspect ratio on average
        self.ratio = (float(ratio[0]) * aspect, float(ratio[1]) * aspect)
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
        self._mean = torch.tensor(self.mean).view(3, 1, 1)
        self._std = torch.tensor(self.std).view(3, 1, 1)
        self.patch_interp = interpolation(patch_interp, "patch_interp")
        self.tokenizer_interp = interpolation(tokenizer_interp, "tokenizer_interp")
        if resize not in ("pil", "tensor"):
            raise ValueError(f"resize must be pil or tensor, got {resize!r}")
        # tensor: uint8 (3, H, W) inputs (data.decode=fast) are resampled as tensors, without a PIL round trip;
        # torchvision has no tensor Lanczos, so a Lanczos view is resampled bicubic there
        self.resize = resize

    def _jitter_params(self, generator: torch.Generator | None) -> torch.Tensor:
        """``(8,)``: the order of the four adjustments (a permutation of 0..3, as torchvision's ColorJitter)
        then the brightness, contrast, saturation and hue factors (identity for a disabled one)."""
        b, c, s, h = self.color_jitter
        if not (b or c or s or h):
            return torch.tensor([0, 1, 2, 3, 1.0, 1.0, 1.0, 0.0])
        order = torch.randperm(4, generator=generator).tolist()
        u = _rand(generator, 4)
        factors = [_between(max(0.0, 1 - b), 1 + b, u[0]) if b else 1.0,
                   _between(max(0.0, 1 - c), 1 + c, u[1]) if c else 1.0,
                   _between(max(0.0, 1 - s), 1 + s, u[2]) if s else 1.0,
                   _between(-h, h, u[3]) if h else 0.0]
        return torch.tensor(order + factors, dtype=torch.float64)

    def _view(self, img: Image.Image | torch.Tensor, box, size: tuple[int, int], interp, flip: bool) -> torch.Tensor:
        top, left, h, w = box
        if isinstance(img, torch.Tensor):  # uint8 (3, H, W), resize="tensor"
            interp = InterpolationMode.BICUBIC if interp == InterpolationMode.LANCZOS else interp
            out = F.resized_crop(img, top, left, h, w, list(size), interpolation=interp, antialias=True)
            return F.horizontal_flip(out) if flip else out
        out = F.resized_crop(img, top, left, h, w, list(size), interpolation=interp, antialias=True)
        if flip:
            out = F.horizontal_flip(out)
        # (H, W, 3) uint8 -> (3, H, W) uint8; numpy: far less overhead than pil_to_tensor
        return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1)

    def raw(self, img: Any, generator: torch.Generator | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The per-sample part: ``(patch uint8, tokenizer view uint8 or None, jitter parameters (8,))``;
        :meth:`finish` turns a batch of them into the views (crop and flip here, jitter there)."""
        if self.resize == "tensor" and isinstance(img, torch.Tensor) and img.dtype == torch.uint8 and img.ndim == 3 \
                and img.shape[0] == 3:
            height, width = img.shape[1:]
        else:
            img = to_rgb_pil(img)
            width, height = img.size
        box = random_resized_crop_params(height, width, self.scale, self.ratio, generator)
        flip = _rand(generator)[0] < self.hflip
        jitter = self._jitter_params(generator)
        patch = self._view(img, box, self.img_hw, self.patch_interp, flip)
        tok = None
        if self.tok_hw is not None:
            tok = self._view(img, box, self.tok_hw, self.tokenizer_interp, flip)
        return patch, tok, jitter

    def finish(self, patch: torch.Tensor, tok: torch.Tensor | None, jitter: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Batched: uint8 ``(B, 3, S, S)`` views and ``(B, 8)`` jitter -> normalised patch view, ``[0, 1]``
        tokenizer view (float32). The same factors act on both views."""
        jittered = color_jitter if any(self.color_jitter) else (lambda x, _: x)
        patch = jittered(patch.float().div_(255.0), jitter)
        patch = patch.sub_(self._mean.to(patch.device)).div_(self._std.to(patch.device))  # F.normalize, cheaper
        if tok is not None:
            tok = jittered(tok.float().div_(255.0), jitter)
        return patch, tok

    def __call__(
        self, img: Any, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        patch, tok, jitter = self.raw(img, generator)
        patch, tok = self.finish(patch[None], None if tok is None else tok[None], jitter[None])
        return patch[0], None if tok is None else tok[0]

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

    :meth:`batched` splits the work for the DataLoader: each sample keeps its uint8 crops and jitter
    parameters, and the returned collate function converts, jitters and normalises the whole batch in a
    few tensor ops (same numbers as the per-sample path: the same parameters and :func:`color_jitter`).
    """

    def __init__(self, views: TwoViewTransform, mask_generator: Callable[[torch.Generator], torch.Tensor],
                 mask_key: str = "mask"):
        self.views = views
        self.mask_generator = mask_generator
        self.mask_key = mask_key  # MAE: "noise" (per-patch uniform noise; its method masks from it)
        self.deferred = False  # True after batched(): samples are uint8 + jitter parameters

    def __call__(self, img: Any) -> dict[str, torch.Tensor]:
        seed = int(torch.randint(0, 2**62, (1,)).item())
        g = torch.Generator().manual_seed(seed)
        patch, tok, jitter = self.views.raw(img, generator=g)
        out = {"images": patch, self.mask_key: self.mask_generator(g), "jitter": jitter}
        if tok is not None:
            out["tok_images"] = tok
        return out if self.deferred else self.collate([out], stack=False)

    def batched(self, on_device: bool = False) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """Defer the per-pixel work to the batch: returns the collate function for the DataLoader. With
        ``on_device`` the batch stays uint8 through the transfer and is finished on the accelerator
        (a :class:`DeviceCollate`: the engine calls its ``on_device`` after moving the batch)."""
        self.deferred = True
        return DeviceCollate(self.collate_uint8, self.finish_batch) if on_device else self.collate

    def collate(self, samples: list[dict[str, torch.Tensor]], stack: bool = True) -> dict[str, torch.Tensor]:
        """uint8 samples -> finished batch (``stack=False``: one sample in, one finished sample out)."""
        b = self.finish_batch(self.collate_uint8(samples))
        return b if stack else {k: v[0] for k, v in b.items()}

    @staticmethod
    def collate_uint8(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """uint8 samples -> a uint8 batch (views, masks, jitter parameters): a quarter of the float batch's
        bytes to move; :meth:`finish_batch` completes it after the transfer, on the accelerator."""
        return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}

    def finish_batch(self, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A :meth:`collate_uint8` batch, on any device -> the finished batch (the same numbers as
        :meth:`collate`: float conversion, colour jitter, normalisation)."""
        b = dict(b)
        patch, tok = self.views.finish(b["images"], b.get("tok_images"), b.pop("jitter"))
        b["images"] = patch
        if tok is not None:
            b["tok_images"] = tok
        return b

    def __repr__(self) -> str:
        return f"BeitPretrainTransform(views={self.views!r}, mask_generator={self.mask_generator!r})"


class DeviceCollate:
    """A collate function whose batches are finished on the device: ``collate(samples)`` runs in the loader
    workers, ``on_device(batch)`` after the transfer (:class:`beit.engine.Trainer` calls it when the
    collate function it is given has one). Picklable for spawned workers."""

    def __init__(self, collate: Callable[[list], Any], on_device: Callable[[Any], Any]) -> None:
        self.collate, self.on_device = collate, on_device

    def __call__(self, samples: list) -> Any:
        return self.collate(samples)
