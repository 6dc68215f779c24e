"""Segmentation evaluation: metrics, whole-image and sliding-window inference, the pictures (confusion,
predictions), the constant baseline.

- :func:`confusion_matrix` / :func:`segmentation_metrics`: mIoU (mmseg's nan-mean over classes with
  union > 0), mAcc, pixel accuracy, per-class IoU, from one ``(C, C)`` count matrix.
- **whole** (``eval.mode=whole``): images resized to ``eval.size`` (default: the model's input) and run in
  one pass; at a size other than the training input the backbone is copied with its position tables
  resized (:func:`backbone_at`).
- **slide** (``eval.mode=slide``, the official ADE20K protocol, mmseg ``slide_inference``): windows of the
  training input size at ``eval.stride`` (default 2/3 of the window: 341 for 512) over the resized image,
  the last window of a row/column flush with the border; logits of overlapping windows averaged.
  With window = image both modes are the same computation.
- :func:`save_predictions`: image | ground truth | prediction rows (:func:`palette` colours);
  :func:`constant_baseline`: the training set's most frequent class everywhere, the floor a segmenter must beat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ..config import ConfigError, ModelConfig, from_dict, image_hw, normalize_img_size, to_dict
from ..data.segmentation import IGNORE_INDEX, SegmentationFolder, load_mask
from ..loading import adapt_state_dict
from ..models.vit import VisionTransformer

# ``task`` below is a :class:`beit.tasks.segment.SegmentationTask` (not imported: that module imports this one)
SegmentationTask = torch.nn.Module

__all__ = ["SegEvalConfig", "backbone_at", "confusion_matrix", "constant_baseline", "palette", "save_confusion",
           "save_predictions", "score", "segmentation_metrics", "slide_logits", "window_starts"]


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


# --------------------------------------------------------------------------------------------- pictures


def palette(num_classes: int) -> np.ndarray:
    """``(256, 3)`` uint8 colours: the PASCAL VOC bit-interleaved palette; 255 (ignore) is white."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for c in range(256):
        r = g = b = 0
        lab = c
        for j in range(8):
            r |= ((lab >> 0) & 1) << (7 - j)
            g |= ((lab >> 1) & 1) << (7 - j)
            b |= ((lab >> 2) & 1) << (7 - j)
            lab >>= 3
        pal[c] = (r, g, b)
    pal[IGNORE_INDEX] = 255  # ignore: white (class 0 is black)
    return pal


def _denorm(x: torch.Tensor) -> np.ndarray:
    """A normalised ``(3, H, W)`` image -> ``(H, W, 3)`` uint8."""
    from ..viz.images import unnormalize

    return (unnormalize(x.cpu().float()[None])[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


@torch.no_grad()
def save_predictions(task: SegmentationTask, dataset: Dataset, out: str | Path, n: int = 4,
                     scale: int = 0) -> Path:
    """PNG with one row per image: image | ground truth | prediction (palette colours, ignore = white)."""
    was_training = task.training
    task.eval()
    device = next(task.parameters()).device
    pal = palette(task.num_classes)
    rows = []
    for i in range(min(n, len(dataset))):  # type: ignore[arg-type]
        item = dataset[i]
        pred = task.predict(item["images"][None].to(device))[0].cpu().numpy()
        gt = item["masks"].numpy()
        rows.append(np.concatenate([_denorm(item["images"]), pal[gt.clip(0, 255)], pal[pred]], axis=1))
    task.train(was_training)
    grid = np.concatenate(rows, axis=0)
    img = Image.fromarray(grid)
    if not scale:
        scale = max(1, math.ceil(256 / grid.shape[0]))  # tiny images: enlarge so the picture is readable
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    out = Path(out)
    img.save(out)
    return out


# --------------------------------------------------------------------------------------------- baselines


def constant_baseline(path: str | Path, splits: Sequence[str] = ("val", "test")) -> dict:
    """Metrics (%) of predicting the training set's most frequent class everywhere, on every split of ``path``
    that exists: the floor any segmenter must beat. ``{"class": c, split: {"mIoU", "mAcc", "pixel_acc"}}``."""
    root = Path(path)
    counts = torch.zeros(256, dtype=torch.long)
    for _, mp in SegmentationFolder(root, "train").samples:
        counts += torch.bincount(torch.from_numpy(load_mask(mp)).flatten().long(), minlength=256)
    counts[IGNORE_INDEX] = 0
    cls = int(counts.argmax())
    num_classes = int(torch.nonzero(counts).max()) + 1
    out: dict = {"class": cls}
    for split in splits:
        if not (root / "images" / split).is_dir():
            continue
        conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
        for _, mp in SegmentationFolder(root, split).samples:
            m = torch.from_numpy(load_mask(mp)).long()
            conf += confusion_matrix(torch.full_like(m, cls), m, num_classes)
        met = segmentation_metrics(conf)
        out[split] = {k: met[k] for k in ("mIoU", "mAcc", "pixel_acc")}
    return out
