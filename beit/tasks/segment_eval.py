"""Segmentation evaluation: metrics, whole-image and sliding-window inference, the confusion picture.

- :func:`confusion_matrix` / :func:`segmentation_metrics`: mIoU (mmseg's nan-mean over classes with
  union > 0), mAcc, pixel accuracy, per-class IoU, from one ``(C, C)`` count matrix.
- **whole** (``eval.mode=whole``): images resized to ``eval.size`` (default: the model's input) and run in
  one pass; at a size other than the training input the backbone is copied with its position tables
  resized (:func:`backbone_at`).
- **slide** (``eval.mode=slide``, the official ADE20K protocol, mmseg ``slide_inference``): windows of the
  training input size at ``eval.stride`` (default 2/3 of the window: 341 for 512) over the resized image,
  the last window of a row/column flush with the border; logits of overlapping windows averaged.
  With window = image both modes are the same computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError, ModelConfig, from_dict, image_hw, normalize_img_size, to_dict
from ..data.segmentation import IGNORE_INDEX
from ..models.vit import VisionTransformer

# ``task`` below is a :class:`beit.tasks.segment.SegmentationTask` (not imported: that module imports this one)
SegmentationTask = torch.nn.Module

__all__ = ["IGNORE_INDEX", "SegEvalConfig", "backbone_at", "confusion_matrix", "save_confusion", "score",
           "segmentation_metrics", "slide_logits", "window_starts"]


@dataclass
class SegEvalConfig:
    mode: str = "whole"  # whole | slide
    size: int | tuple[int, int] = 0  # images resized to [height, width] before scoring; 0: the model's input
    stride: int | tuple[int, int] = 0  # slide: [rows, columns] between windows; 0: 2/3 of the window

    def __post_init__(self) -> None:
        if self.mode not in ("whole", "slide"):
            raise ConfigError(f"eval.mode must be whole or slide, got {self.mode!r}")
        if self.size != 0:
            self.size = normalize_img_size(self.size, "eval.size")
        if self.stride != 0:
            self.stride = normalize_img_size(self.stride, "eval.stride")

    def image_size(self, window: tuple[int, int]) -> tuple[int, int]:
        return window if self.size == 0 else image_hw(self.size)

    def strides(self, window: tuple[int, int]) -> tuple[int, int]:
        if self.stride == 0:
            return (max(1, window[0] * 2 // 3), max(1, window[1] * 2 // 3))
        return image_hw(self.stride)


# --------------------------------------------------------------------------------------------- metrics


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``(C, C)`` int64 counts, rows = ground truth, columns = prediction; ignored pixels left out."""
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def segmentation_metrics(conf: torch.Tensor) -> dict[str, float]:
    """mIoU (mean over classes with union > 0), mAcc (over classes in the ground truth), pixel accuracy
    (all in %) and ``iou_<c>`` for every class with union > 0."""
    conf = conf.double()
    tp = conf.diag()
    gt = conf.sum(1)
    pr = conf.sum(0)
    union = gt + pr - tp
    present = union > 0
    iou = tp / union.clamp(min=1)
    out = {
        "mIoU": 100.0 * float(iou[present].mean()) if present.any() else 0.0,
        "mAcc": 100.0 * float((tp / gt.clamp(min=1))[gt > 0].mean()) if (gt > 0).any() else 0.0,
        "pixel_acc": 100.0 * float(tp.sum() / conf.sum().clamp(min=1)),
    }
    for c in torch.nonzero(present).flatten().tolist():
        out[f"iou_{c}"] = 100.0 * float(iou[c])
    return out


# --------------------------------------------------------------------------------------------- inference


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Offsets of the windows along one side (mmseg ``slide_inference``): every ``stride``, the last one
    moved back to end at the border."""
    if size < window:
        raise ConfigError(f"eval.size side {size} is smaller than the window {window} (the training input)")
    n = max(size - window + stride - 1, 0) // stride + 1
    return [min(i * stride, size - window) for i in range(n)]


@torch.no_grad()
def slide_logits(task: SegmentationTask, images: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, C, H, W)``: logits of training-size windows, averaged where they overlap."""
    B, _, H, W = images.shape
    wh, ww = task.model.patch_embed.img_hw
    out = images.new_zeros(B, task.num_classes, H, W, dtype=torch.float32)
    count = images.new_zeros(1, 1, H, W, dtype=torch.float32)
    for y in window_starts(H, wh, stride[0]):
        for x in window_starts(W, ww, stride[1]):
            out[..., y:y + wh, x:x + ww] += task.logits(images[..., y:y + wh, x:x + ww])[0].float()
            count[..., y:y + wh, x:x + ww] += 1
    return out / count


def backbone_at(model: VisionTransformer, size: tuple[int, int]) -> VisionTransformer:
    """``model`` itself at its own input size, else a copy for ``size`` with position tables resized."""
    from ..interop import adapt_state_dict

    if tuple(size) == model.patch_embed.img_hw:
        return model
    cfg = from_dict(ModelConfig, {**to_dict(model.cfg), "img_size": list(size)}, prefix="model.")
    other = VisionTransformer(cfg).to(next(model.parameters()).device)
    other.load_state_dict(adapt_state_dict(model.state_dict(), other, model.grid_size))
    return other.eval()


@torch.no_grad()
def score(task: SegmentationTask, loader, cfg: SegEvalConfig) -> tuple[torch.Tensor, float]:
    """``(confusion matrix, mean cross-entropy per labelled pixel)`` of ``task`` over ``loader``'s batches
    (images already at ``cfg``'s size), by whole-image or sliding-window inference."""
    device = next(task.parameters()).device
    window = task.model.patch_embed.img_hw
    backbone = backbone_at(task.model, cfg.image_size(window)) if cfg.mode == "whole" else None
    conf = torch.zeros(task.num_classes, task.num_classes, dtype=torch.long)
    loss_sum, n = 0.0, 0
    for batch in loader:
        images, masks = batch["images"].to(device), batch["masks"].to(device)
        if backbone is None:
            out = slide_logits(task, images, cfg.strides(window))
        else:
            out = task.logits(images, backbone)[0]
        valid = int((masks != IGNORE_INDEX).sum())
        if valid:
            loss_sum += float(F.cross_entropy(out.float(), masks, ignore_index=IGNORE_INDEX)) * valid
            n += valid
        conf += confusion_matrix(out.argmax(1), masks, task.num_classes)
    return conf, loss_sum / max(n, 1)


# --------------------------------------------------------------------------------------------- picture


def save_confusion(conf: torch.Tensor, out: str | Path, names: list[str] | None = None, title: str = "") -> Path:
    """PNG of the row-normalised confusion matrix (rows: truth, columns: prediction; a row's cells are the
    share of that class's pixels, in %), diagonal = per-class accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    C = conf.shape[0]
    names = list(names or [])[:C] + [str(c) for c in range(len(names or []), C)]
    rows = conf.double() / conf.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * C, 0.8 + 0.45 * C))
    ax.imshow(rows.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    if C <= 25:
        for i, j in np.ndindex(C, C):
            v = 100 * float(rows[i, j])
            if v >= 0.5:
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if v > 60 else "black")
    ax.set_xticks(range(C), names, rotation=90, fontsize=7)
    ax.set_yticks(range(C), names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title or "confusion (% of each true class)", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
