"""Semantic segmentation with a BEiT backbone and an UperNet (or SETR-PUP) head (arXiv 2106.08254, Sec. 3.2).

``beit segment --data DIR --init CKPT --out RUN``: ``DIR/images/{train,val}/`` hold the images and
``DIR/masks/{train,val}/`` single-channel PNG label maps of the same name (stem) and size; a label is a
class index, 255 = ignore. The one engine trains :class:`SegmentationTask` and evaluates it each epoch:

- the backbone's blocks ``out_indices`` (depth 12: 3, 5, 7, 11, as the official config) feed the
  multi-scale adapter of :mod:`.heads` (4x, 2x, 1x, 0.5x) and UperNet (PPM + FPN + fuse), or SETR-PUP on
  the last of them (``head.kind=pup``); logits are upsampled (bilinear) to the input size;
- loss: cross-entropy with ``ignore_index=255``, plus 0.4 x an auxiliary FCN head on the third level
  (official config); AdamW with layer-wise lr decay (0.65), linear warmup then polynomial decay (power 1,
  ``optim.schedule=poly``, the official mmseg schedule);
- metrics (``val_*`` in ``metrics.jsonl``): mIoU over the classes present (in the ground truth or the
  prediction, i.e. union > 0, as mmseg's nan-mean), mean class accuracy, pixel accuracy, per-class IoU
  ``iou_<c>``; ``predictions.png`` shows images | ground truth | prediction for a few validation images;
  the best val mIoU is kept in ``checkpoints/best``, scored at the end on val and test
  (:func:`evaluate_run`: ``eval.json``, ``confusion_<split>.png``, ``predictions_<split>.png``).

Joint transforms: training takes one random resized crop (aspect ratio around the input's) + horizontal
flip of image and mask (bicubic for the image, nearest for the mask), at the model's input size
(``model.img_size``, square or ``[height, width]``); evaluation resizes both to ``eval.size`` (default:
the input size) and scores there, by one pass over the whole image or by sliding windows of the input size
(``eval.mode=slide``, the official protocol; :mod:`.segment_eval`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .. import engine, recipes
from ..checkpoint import CKPT_DIR
from ..config import (
    ConfigError,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    check_fields,
    from_dict,
    resolve,
    to_dict,
)
from ..data.folder import DataError, DropUnreadable
from ..data.segmentation import IGNORE_INDEX, SegmentationFolder, SegTransform
from ..data.views import IMAGENET_MEAN, IMAGENET_STD, check_fixed_normalisation
from ..engine import DistEnv, Training, TrainingTask, TrainResult, autocast_context
from ..loading import adopt_architecture, build_backbone, resumed_model_config, run_weights
from ..methods.base import Method
from ..models.vit import VisionTransformer
from ..optim import param_groups
from ..runs import RunDir
from ..viz.curves import run_curves
from .heads import FCNHead, FeaturePyramid, PUPHead, UperNetHead, tokens_to_map
from .segment_eval import (
    SegEvalConfig,
    backbone_at,
    confusion_matrix,
    save_confusion,
    save_predictions,
    score,
    segmentation_metrics,
    slide_logits,
)

log = logging.getLogger("beit")

__all__ = [
    "PRESETS",
    "SegEvalConfig",
    "SegmentConfig",
    "Segmentation",
    "SegmentationTask",
    "build_config",
    "confusion_matrix",
    "evaluate_run",
    "load_segmenter",
    "run",
    "segmentation_metrics",
]


@dataclass
class SegDataConfig:
    path: str = ""  # DIR with images/{train,val}/ and masks/{train,val}/
    num_classes: int = 0  # 0: 1 + the largest label in the training masks (255 = ignore)
    crop_scale: tuple[float, float] = (0.25, 1.0)  # random resized crop (area fraction of the image)
    hflip: float = 0.5
    class_names: list[str] = field(default_factory=list)  # for the confusion picture and eval.json
    # the transforms' normalisation, recorded for beit.load/transform_for/export (ImageNet statistics only)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        check_fields(self, "data", {"num_classes": "count", "hflip": "prob", "crop_scale": "positive"})
        check_fixed_normalisation(self.mean, self.std, "data")


@dataclass
class SegHeadConfig:
    kind: str = "upernet"  # upernet | pup (SETR progressive upsampling)
    channels: int = 768  # width of the head (official BEiT-base UperNet: 768)
    out_indices: list[int] = field(default_factory=list)  # blocks feeding the head; []: 3,5,7,11 for depth 12
    pool_scales: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    dropout: float = 0.1
    aux_weight: float = 0.4  # auxiliary FCN head on the third level; 0 disables
    aux_channels: int = 256

    def __post_init__(self) -> None:
        check_fields(self, "head", {"channels aux_channels": "size", "dropout": "rate", "aux_weight": "nonneg",
                                    "pool_scales": "size"})
        if self.kind not in ("upernet", "pup"):
            raise ConfigError(f"head.kind must be upernet or pup, got {self.kind!r}")
        if self.out_indices and len(self.out_indices) != 4:
            raise ConfigError(f"head.out_indices needs 4 block indices, got {self.out_indices}")


@dataclass
class SegmentConfig:
    init: str = ""  # backbone checkpoint (anything beit.load reads); "" or "none": from scratch
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        img_size=512, use_shared_rel_pos_bias=False, use_rel_pos_bias=True))
    data: SegDataConfig = field(default_factory=SegDataConfig)
    head: SegHeadConfig = field(default_factory=SegHeadConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=7e-4, min_lr=0.0, weight_decay=0.05, warmup_steps=1500, clip_grad=0.0, layer_decay=0.65,
        schedule="poly", power=1.0))
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)


CAMVID_CLASSES = recipes.CAMVID_CLASSES
PRESETS: dict[str, dict] = recipes.SEGMENT  # the recipes live in beit.recipes (no torch)

def build_config(preset: str | None = None, config: str | None = None,
                 overrides: list[str] | dict | None = None) -> SegmentConfig:
    return resolve(SegmentConfig, PRESETS, preset, config, overrides)


# --------------------------------------------------------------------------------------------- data


# --------------------------------------------------------------------------------------------- the task


def default_out_indices(depth: int) -> list[int]:
    """Blocks feeding the head: the official 3, 5, 7, 11 (depth 12) / 7, 11, 15, 23 (24), else evenly spread."""
    known = {12: [3, 5, 7, 11], 24: [7, 11, 15, 23]}
    return known.get(depth, [max(0, round(depth * (k + 1) / 4) - 1) for k in range(4)])


class SegmentationTask(Method):
    """``batch = {"images" (B, 3, H, W), "masks" (B, H, W) int64, 255 = ignore}`` -> ``(CE, {"pixel_acc"})``."""

    best_metric = "mIoU"
    state_prefix = "model."
    find_unused_parameters = True  # the backbone's final norm is not used by the heads

    def __init__(self, model: VisionTransformer, num_classes: int, head: SegHeadConfig | None = None,
                 eval_cfg: SegEvalConfig | None = None) -> None:
        super().__init__()
        head = head if head is not None else SegHeadConfig()
        self.eval_cfg = eval_cfg if eval_cfg is not None else SegEvalConfig()
        if num_classes < 1:
            raise ConfigError("segmentation needs num_classes >= 1")
        self.model = model
        self.num_classes = num_classes
        self.kind = head.kind
        depth = model.num_layers
        idx = list(head.out_indices) or default_out_indices(depth)
        if any(not -depth <= i < depth for i in idx):
            raise ConfigError(f"head.out_indices {idx} out of range for depth {depth}")
        self.out_indices = [i % depth for i in idx]
        D = model.embed_dim
        if head.kind == "upernet":
            self.neck = FeaturePyramid(D)
            self.decode = UperNetHead(D, num_classes, head.channels, head.pool_scales, head.dropout)
        else:
            self.neck = None
            self.decode = PUPHead(D, num_classes, head.channels, dropout=head.dropout)
        self.aux_weight = head.aux_weight
        self.aux = FCNHead(D, num_classes, head.aux_channels, head.dropout) if head.aux_weight > 0 else None

    def logits(self, images: torch.Tensor, backbone: VisionTransformer | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-pixel logits ``(B, C, H, W)`` at the input size, and the auxiliary head's (training only).
        ``backbone``: the backbone at another input size (:func:`.segment_eval.backbone_at`)."""
        H, W = images.shape[-2:]
        backbone = backbone if backbone is not None else self.model
        uniq = sorted(set(self.out_indices))
        by = dict(zip(uniq, backbone.get_intermediate_layers(images, uniq)))  # each (B, 1+N, D)
        tokens = [by[i] for i in self.out_indices]
        grid = backbone.grid_size
        if self.neck is not None:
            out = self.decode(self.neck([tokens_to_map(t, grid) for t in tokens]))  # (B, C, 4h, 4w)
        else:
            out = self.decode(tokens[-1], grid)  # (B, C, 16h, 16w)
        out = F.interpolate(out, size=(H, W), mode="bilinear", align_corners=False)
        aux = None
        if self.aux is not None and self.training:
            aux = F.interpolate(self.aux(tokens_to_map(tokens[2], grid)), size=(H, W), mode="bilinear",
                                align_corners=False)
        return out, aux

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, H, W)`` class ids, by ``eval.mode`` (whole image or sliding window)."""
        if self.eval_cfg.mode == "slide":
            return slide_logits(self, images, self.eval_cfg.strides(self.model.patch_embed.img_hw)).argmax(1)
        return self.logits(images, backbone_at(self.model, tuple(images.shape[-2:])))[0].argmax(1)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, masks = batch["images"], batch["masks"]  # (B, 3, H, W), (B, H, W)
        out, aux = self.logits(images)
        loss = F.cross_entropy(out.float(), masks, ignore_index=IGNORE_INDEX)
        if aux is not None:
            loss = loss + self.aux_weight * F.cross_entropy(aux.float(), masks, ignore_index=IGNORE_INDEX)
        with torch.no_grad():
            valid = masks != IGNORE_INDEX
            acc = 100.0 * ((out.argmax(1) == masks) & valid).sum() / valid.sum().clamp(min=1)  # %, as val_pixel_acc
        if not torch.isfinite(loss) and not valid.any():  # a crop with only ignored pixels
            loss = out.sum() * 0.0
        return loss, {"pixel_acc": acc.float()}

    @torch.no_grad()
    def evaluate(self, loader) -> dict[str, float]:
        conf, loss = score(self, loader, self.eval_cfg)
        return {**segmentation_metrics(conf), "loss": loss}

    def param_groups(self, optim_cfg: OptimConfig) -> list[dict]:
        """Layer-wise lr decay over the backbone; neck and heads at the full rate."""
        return param_groups(self, optim_cfg.weight_decay, optim_cfg.layer_decay, num_layers=self.model.num_layers)


# --------------------------------------------------------------------------------------------- running


def build_task(cfg: SegmentConfig, num_classes: int, init: bool = True) -> tuple[SegmentationTask, SegmentConfig]:
    mcfg = adopt_architecture(cfg.model, cfg.init) if init else cfg.model
    mcfg = from_dict(ModelConfig, {**to_dict(mcfg), "num_classes": 0, "vocab_size": 0, "use_mask_token": False},
                     prefix="model.")
    backbone = build_backbone(cfg.init if init else "", mcfg)
    cfg = dataclasses.replace(cfg, model=backbone.cfg, data=dataclasses.replace(cfg.data, num_classes=num_classes))
    return SegmentationTask(backbone, num_classes, cfg.head, cfg.eval), cfg


def load_segmenter(path: str | Path) -> SegmentationTask:
    """The whole segmenter (backbone + heads) of a ``beit segment`` run or one of its checkpoint folders."""
    config, weights = run_weights(path)
    cfg = from_dict(SegmentConfig, config)
    task, _ = build_task(cfg, cfg.data.num_classes, init=False)
    task.load_state_dict(weights, strict=True)
    return task.eval()


def evaluate_run(path: str | Path, splits: Sequence[str] = ("val", "test"), data: str | None = None,
                 n_pictures: int = 4) -> dict:
    """Score a run's best checkpoint (else its latest) on every split of its data that exists, as the run's
    ``eval`` config says (whole image or sliding window). Writes ``RUN/eval.json`` (metrics in %, per-class
    IoU by name, confusion matrices), ``RUN/confusion_<split>.png`` and ``RUN/predictions_<split>.png``.
    Runs in the run's (resolved) precision, as its evaluations during training."""
    run_dir = Path(path)
    best = run_dir / CKPT_DIR / "best"
    source = best if best.is_dir() else run_dir
    task = load_segmenter(source)
    cfg = from_dict(SegmentConfig, RunDir(source).config())
    root = Path(data or cfg.data.path)
    size = cfg.eval.image_size(task.model.patch_embed.img_hw)
    names = list(cfg.data.class_names) + [str(c) for c in range(len(cfg.data.class_names), task.num_classes)]
    precision = cfg.train.precision if cfg.train.precision in ("fp32", "bf16") else "fp32"
    results: dict = {"checkpoint": str(RunDir(source).checkpoint()), "eval": to_dict(cfg.eval)}
    for split in splits:
        if not (root / "images" / split).is_dir():
            continue
        ds = SegmentationFolder(root, split, SegTransform(size, False))
        with autocast_context(next(task.parameters()).device, precision):  # as evaluated during training
            conf, loss = score(task, DataLoader(ds, batch_size=8, collate_fn=DropUnreadable()), cfg.eval)
        m = segmentation_metrics(conf)
        per_class = {names[c]: m[f"iou_{c}"] for c in range(task.num_classes) if f"iou_{c}" in m}
        results[split] = {"mIoU": m["mIoU"], "mAcc": m["mAcc"], "pixel_acc": m["pixel_acc"], "loss": loss,
                          "images": len(ds), "iou": per_class, "confusion": conf.tolist()}
        save_confusion(conf, run_dir / f"confusion_{split}.png", names,
                       title=f"{split}: mIoU {m['mIoU']:.1f}, mAcc {m['mAcc']:.1f} (% of each true class)")
        save_predictions(task, ds, run_dir / f"predictions_{split}.png", n=n_pictures)
        log.info("%s (%d images): mIoU %.2f, mAcc %.2f, pixel acc %.2f", split, len(ds), m["mIoU"], m["mAcc"],
                 m["pixel_acc"])
    (run_dir / "eval.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


class Segmentation(TrainingTask):
    """Segmentation for :func:`beit.engine.run`: the folder's train/val splits, the segmenter on the backbone
    of ``init`` (or, resuming, the architecture the run saved); at the end its predictions and the best
    checkpoint scored (:func:`evaluate_run`)."""

    def build(self, cfg: SegmentConfig, env: DistEnv, out: Path, resume: bool) -> Training:
        if not cfg.data.path:
            raise ConfigError("give the dataset: --data DIR (with images/{train,val}/ and masks/{train,val}/)")
        size = cfg.model.img_size
        tr = SegmentationFolder(cfg.data.path, "train", SegTransform(size, True, cfg.data.crop_scale, cfg.data.hflip))
        va = SegmentationFolder(cfg.data.path, "val", SegTransform(cfg.eval.image_size(cfg.model.img_hw), False))
        num_classes = cfg.data.num_classes or tr.max_label() + 1
        if num_classes < 1:
            raise DataError(f"{cfg.data.path}: the training masks hold no label other than {IGNORE_INDEX} (ignore)")
        saved = resumed_model_config(out, resume)
        if saved is not None:
            cfg = dataclasses.replace(cfg, model=saved)
        task, cfg = build_task(cfg, num_classes, init=saved is None)
        if env.is_main:
            log.info("segmentation (%s head) on %d images, %d classes (val: %d), blocks %s; init: %s", cfg.head.kind,
                     len(tr), num_classes, len(va), task.out_indices, cfg.init or "none")
        return Training(task, tr, cfg, val_dataset=va, desc="segment")

    def outputs(self, training: Training, result: TrainResult) -> dict[str, Callable[[], Any]]:
        out = Path(result.run_dir)
        return {"predictions.png": partial(save_predictions, training.method, training.val_dataset,
                                           out / "predictions.png"),
                "curves.png": run_curves(out, "curves.png", ("loss", "pixel_acc", "val_mIoU", "val_pixel_acc", "lr"),
                                         "segmentation"),
                "eval.json (the best checkpoint scored)": partial(evaluate_run, out)}


def run(cfg: SegmentConfig, out: str | Path, *, resume: bool = False, max_minutes: float = 0.0,
        resume_anyway: bool = False) -> TrainResult:
    """Train a segmenter as ``cfg`` says into run directory ``out``; then score its best checkpoint on the
    validation and (if the data has one) test split (:func:`evaluate_run`)."""
    return engine.run(Segmentation(), cfg, out, resume=resume, max_minutes=max_minutes, resume_anyway=resume_anyway)
