"""Fine-tuning augmentation: RandAugment, random erasing, Mixup/CutMix with label smoothing.

The official BEiT fine-tuning recipe (arXiv 2106.08254, Appendix C; ``run_class_finetuning.py``, which
uses timm's ``create_transform`` and ``Mixup``): random resized crop (bicubic) + horizontal flip +
RandAugment ``rand-m9-mstd0.5-inc1`` + random erasing 0.25 (per-pixel noise) on the sample; Mixup 0.8
and CutMix 1.0 (one of the two per batch, each with probability 0.5) with label smoothing 0.1 on the
batch. Colour jitter is off when RandAugment is on (timm does the same).

Differences from timm, on purpose (torchvision only, no timm at run time):

- RandAugment is torchvision's ``RandAugment(num_ops=2, magnitude=9)``: the same 14-op family at a fixed
  magnitude 9, without timm's magnitude noise (``mstd0.5``) and its "increasing" op variants (``inc1``).
- Random erasing is torchvision's ``RandomErasing(value="random")``, i.e. timm's ``mode="pixel"`` (normal
  noise per pixel), one box per image.

Every random draw comes from torch's global RNG: the engine seeds it per sample for the per-sample
transform and checkpoints it for the batch-level Mixup/CutMix, so runs resume exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..data.views import IMAGENET_MEAN, IMAGENET_STD, eval_transform, interpolation

__all__ = [
    "AugConfig",
    "Mixup",
    "build_eval_transform",
    "build_train_transform",
    "one_hot_smooth",
    "soft_cross_entropy",
]


@dataclass
class AugConfig:
    """Fine-tuning augmentation (BEiT Appendix C, official defaults)."""

    mixup: float = 0.8  # Beta(alpha, alpha) for Mixup; 0 disables
    cutmix: float = 1.0  # Beta(alpha, alpha) for CutMix; 0 disables
    mixup_prob: float = 1.0  # probability of mixing a batch at all
    switch_prob: float = 0.5  # with both on: probability of CutMix instead of Mixup
    label_smoothing: float = 0.1
    randaug_ops: int = 2  # RandAugment: ops per image (0 disables RandAugment)
    randaug_magnitude: int = 9  # RandAugment magnitude (of 30 bins, as timm's m9)
    reprob: float = 0.25  # random erasing probability
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    interpolation: str = "bicubic"
    eval_crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, then center crop (224/256)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for key in ("mixup", "cutmix", "label_smoothing", "reprob"):
            if getattr(self, key) < 0:
                raise ConfigError(f"aug.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("mixup_prob", "switch_prob", "hflip", "reprob", "label_smoothing"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"aug.{key} must lie in [0, 1], got {getattr(self, key)}")
        if not 0.0 < self.eval_crop_pct <= 1.0:
            raise ConfigError(f"aug.eval_crop_pct must lie in (0, 1], got {self.eval_crop_pct}")
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ConfigError(f"aug.crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")


def _aug_interp(cfg: AugConfig):
    return interpolation(cfg.interpolation, "aug.interpolation", allowed=("bicubic", "bilinear", "nearest"))


def build_train_transform(cfg: AugConfig, img_size: int):
    """PIL image -> normalised ``(3, img_size, img_size)`` tensor with the fine-tuning augmentation."""
    from torchvision import transforms as T

    ops = [
        T.RandomResizedCrop(img_size, scale=tuple(cfg.crop_scale), interpolation=_aug_interp(cfg)),
        T.RandomHorizontalFlip(cfg.hflip),
    ]
    if cfg.randaug_ops > 0:
        ops.append(T.RandAugment(num_ops=cfg.randaug_ops, magnitude=cfg.randaug_magnitude,
                                 interpolation=interpolation("bilinear")))
    ops += [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    if cfg.reprob > 0:
        ops.append(T.RandomErasing(p=cfg.reprob, value="random"))
    return T.Compose(ops)


def build_eval_transform(cfg: AugConfig, img_size: int):
    """Resize the short side to ``img_size / eval_crop_pct``, center crop ``img_size``, normalise
    (:func:`beit.data.views.eval_transform`, the one copy)."""
    _aug_interp(cfg)  # the allowed interpolations, named as aug.interpolation
    return eval_transform(img_size, cfg.eval_crop_pct, cfg.mean, cfg.std, cfg.interpolation)


# --------------------------------------------------------------------------------------------- targets


def one_hot_smooth(targets: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """``(B,)`` labels -> ``(B, C)`` smoothed one-hot rows summing to 1 (timm: off = s / C, on = 1 - s + off)."""
    off = smoothing / num_classes
    out = torch.full((targets.shape[0], num_classes), off, device=targets.device, dtype=torch.float32)
    return out.scatter_(1, targets.long().view(-1, 1), 1.0 - smoothing + off)


def soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c t_c log softmax(logits)_c`` (timm ``SoftTargetCrossEntropy``)."""
    return torch.sum(-soft_targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def _beta(alpha: float) -> float:
    a = torch.tensor([float(alpha)])
    return float(torch.distributions.Beta(a, a).sample())


def cutmix_box(h: int, w: int, lam: float) -> tuple[int, int, int, int]:
    """Box ``(y0, y1, x0, x1)`` covering about ``1 - lam`` of an ``h x w`` image, centre uniform, clipped
    at the border (Yun et al. 2019; timm ``rand_bbox``)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(0, h, (1,))), int(torch.randint(0, w, (1,)))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return y0, y1, x0, x1


class Mixup:
    """Batch-level Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) with label smoothing.

    ``mixup(images (B, C, H, W), labels (B,)) -> (mixed images, soft targets (B, num_classes))``. Each batch
    is mixed with its reverse (timm ``mode="batch"``); one ``lam ~ Beta(alpha, alpha)`` per batch; for
    CutMix ``lam`` is corrected to the exact pasted area. Targets are
    ``lam * smooth(y) + (1 - lam) * smooth(y.flip(0))`` and sum to 1 per row.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 prob: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.1) -> None:
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, cfg: AugConfig, num_classes: int) -> Mixup:
        return cls(num_classes, cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.switch_prob, cfg.label_smoothing)

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def _draw(self) -> tuple[float, bool]:
        """(lam, use_cutmix); lam = 1 means no mixing."""
        if not self.enabled or float(torch.rand(())) >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = float(torch.rand(())) < self.switch_prob
        else:
            use_cutmix = self.cutmix_alpha > 0
        return _beta(self.cutmix_alpha if use_cutmix else self.mixup_alpha), use_cutmix

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam, use_cutmix = self._draw()
        if lam < 1.0:
            if use_cutmix:
                H, W = images.shape[-2:]
                y0, y1, x0, x1 = cutmix_box(H, W, lam)
                images = images.clone()
                images[..., y0:y1, x0:x1] = images.flip(0)[..., y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W)
            else:
                images = images * lam + images.flip(0) * (1.0 - lam)
        y1_ = one_hot_smooth(labels, self.num_classes, self.label_smoothing)
        y2_ = one_hot_smooth(labels.flip(0), self.num_classes, self.label_smoothing)
        return images, y1_ * lam + y2_ * (1.0 - lam)
