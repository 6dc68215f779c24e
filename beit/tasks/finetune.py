"""Image classification fine-tuning (BEiT, arXiv 2106.08254, Sec. 3.1 and Appendix C).

``beit finetune --data DIR --init CKPT|none --out RUN`` trains a classifier on ``DIR/train/<class>/`` and
evaluates it on ``DIR/val/<class>/`` after every epoch, on the one engine. The paper's recipe:

- the backbone from any checkpoint :func:`beit.load` reads (``--init none``: from scratch, same recipe);
  the shared relative position bias of pretraining becomes one copy per layer (Sec. 2.2);
- mean pooling of the patch tokens -> LayerNorm (``fc_norm``) -> linear head with weights scaled by 0.001;
- AdamW (weight decay 0.05), layer-wise lr decay (0.65 for base), linear warmup then cosine decay;
- RandAugment, random erasing, Mixup/CutMix with label smoothing, stochastic depth (:mod:`.augment`).

A run saves ``config.yaml`` whose ``model`` section is the classifier's exact config (``num_classes``,
per-layer relative position tables), so ``beit.load(RUN)`` returns the trained classifier, and
``beit.load(RUN/checkpoints/best)`` the best one on the validation set.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .. import engine, recipes
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
from ..data import cache as decode_cache
from ..data.folder import ImageFolder
from ..data.labelled import LabelledDataset, labelled_splits
from ..engine import DistEnv, Training, TrainingTask, TrainResult
from ..loading import adopt_architecture, build_backbone, resumed_model_config
from ..methods.base import Method
from ..models.vit import VisionTransformer
from ..optim import param_groups
from ..runs import RunDir
from ..viz.curves import run_curves
from .augment import (
    AugConfig,
    Mixup,
    build_eval_transform,
    build_train_transform,
    one_hot_smooth,
    soft_cross_entropy,
)
from .metrics import topk_correct

log = logging.getLogger("beit")

__all__ = [
    "PRESETS",
    "ClassificationTask",
    "FinetuneConfig",
    "FinetuneDataConfig",
    "Finetuning",
    "build_config",
    "run",
]


@dataclass
class FinetuneDataConfig:
    path: str = ""  # DIR with train/<class>/ and val/<class>/
    labels_per_class: int = 0  # keep N training images per class (balanced, seeded); 0: all
    label_fraction: float = 0.0  # or keep this fraction of each class (0: all)
    # decode the train and val images once into OUT/decode_cache (uint8, memory-mapped; rebuilt when a file
    # changes): auto = when they fit in 4 GB | on | off. Few labels mean many epochs: without it each step
    # decoded its PNGs again (a third of a small fine-tuning step's data time)
    decode_cache: str = "auto"

    def __post_init__(self) -> None:
        check_fields(self, "data", {"labels_per_class": "count", "label_fraction": "prob"})
        if self.decode_cache not in ("auto", "on", "off"):
            raise ConfigError(f"data.decode_cache must be auto, on or off, got {self.decode_cache!r}")


@dataclass
class FinetuneConfig:
    init: str = ""  # checkpoint to start from (anything beit.load reads); "" or "none": from scratch
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        use_shared_rel_pos_bias=False, use_rel_pos_bias=True, use_mean_pooling=True, head_init_scale=0.001))
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=4e-3, min_lr=1e-6, weight_decay=0.05, warmup_fraction=0.2, clip_grad=0.0, layer_decay=0.65))
    train: TrainConfig = field(default_factory=TrainConfig)
    aug: AugConfig = field(default_factory=AugConfig)


PRESETS: dict[str, dict] = recipes.FINETUNE  # the recipes live in beit.recipes (no torch)

def build_config(preset: str | None = None, config: str | None = None,
                 overrides: list[str] | dict | None = None) -> FinetuneConfig:
    return resolve(FinetuneConfig, PRESETS, preset, config, overrides)


# --------------------------------------------------------------------------------------------- the task


class ClassificationTask(Method):
    """``batch = (images (B, 3, H, W), labels (B,))`` -> ``(soft-target CE, {"acc"})`` for the engine.

    In training, the batch is mixed by Mixup/CutMix with smoothed soft targets (``acc`` is measured against
    the unmixed labels, so it is only a trend; in %); in evaluation, ``evaluate`` gives top-1, top-5 and the plain
    cross-entropy. The backbone's state is under ``model.`` (``state_prefix``) for ``beit.load``.
    """

    best_metric = "top1"
    state_prefix = "model."

    def __init__(self, model: VisionTransformer, aug: AugConfig | None = None) -> None:
        super().__init__()
        if model.cfg.num_classes <= 0:
            raise ConfigError("the classifier needs model.num_classes > 0")
        self.model = model
        self.num_classes = model.cfg.num_classes
        aug = aug if aug is not None else AugConfig(mixup=0.0, cutmix=0.0, label_smoothing=0.0)
        self.mixup = Mixup.from_config(aug, self.num_classes)
        self.label_smoothing = aug.label_smoothing

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, labels = batch[0], batch[1]  # (B, 3, H, W), (B,)
        if self.training and self.mixup.enabled:
            images, soft = self.mixup(images, labels)  # soft (B, C), rows sum to 1
        else:
            soft = one_hot_smooth(labels, self.num_classes, self.label_smoothing)
        logits = self.model(images)  # (B, C)
        loss = soft_cross_entropy(logits, soft)
        with torch.no_grad():
            acc = 100.0 * (logits.argmax(-1) == labels).float().mean()  # %, as val_top1
        return loss, {"acc": acc}

    @torch.no_grad()
    def evaluate(self, loader) -> dict[str, float]:
        device = next(self.parameters()).device
        n = top1 = top5 = 0
        loss_sum = 0.0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = self.model(images).float()
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            c1, c5 = topk_correct(logits, labels, (1, 5))
            top1, top5, n = top1 + c1, top5 + c5, n + len(labels)
        n = max(n, 1)
        out = {"top1": 100.0 * top1 / n, "loss": loss_sum / n}
        if self.model.cfg.num_classes > 5:  # with 5 classes or fewer top-5 is 100% by construction: not reported
            out["top5"] = 100.0 * top5 / n
        return out

    def param_groups(self, optim_cfg: OptimConfig) -> list[dict]:
        """Weight-decay exclusions plus layer-wise lr decay over the backbone's depth (head: full lr)."""
        return param_groups(self, optim_cfg.weight_decay, optim_cfg.layer_decay, num_layers=self.model.num_layers)


def build_task(cfg: FinetuneConfig, num_classes: int, init: bool = True) -> tuple[ClassificationTask, FinetuneConfig]:
    """The classifier for ``cfg`` with ``num_classes`` outputs, and the config that rebuilds it exactly.
    ``init=False``: ``cfg.model`` as it is, randomly initialised (resuming: the checkpoint has the weights)."""
    mcfg = adopt_architecture(cfg.model, cfg.init) if init else cfg.model
    mcfg = from_dict(ModelConfig, {**to_dict(mcfg), "num_classes": num_classes, "vocab_size": 0,
                                   "use_mask_token": False}, prefix="model.")
    model = build_backbone(cfg.init if init else "", mcfg)
    cfg = dataclasses.replace(cfg, model=model.cfg)
    return ClassificationTask(model, cfg.aug), cfg


class Finetuning(TrainingTask):
    """Fine-tuning for :func:`beit.engine.run`: labelled splits (a folder, or ``datasets``), the classifier on
    the backbone of ``init`` (or, resuming, the architecture the run saved), the class names beside it."""

    def __init__(self, datasets: tuple[Dataset, Dataset | None] | None = None) -> None:
        self.datasets = datasets

    def build(self, cfg: FinetuneConfig, env: DistEnv, out: Path, resume: bool) -> Training:
        size = cfg.model.img_size
        if self.datasets is None:
            tr, va = labelled_splits(cfg.data.path, build_train_transform(cfg.aug, size),
                                     build_eval_transform(cfg.aug, size), labels_per_class=cfg.data.labels_per_class,
                                     label_fraction=cfg.data.label_fraction, seed=cfg.train.seed)
        else:
            tr = LabelledDataset(self.datasets[0], build_train_transform(cfg.aug, size))
            va = (LabelledDataset(self.datasets[1], build_eval_transform(cfg.aug, size), tr.classes)
                  if self.datasets[1] is not None else None)
        saved = resumed_model_config(out, resume)
        if saved is not None:
            cfg = dataclasses.replace(cfg, model=saved)
        task, cfg = build_task(cfg, len(tr.classes), init=saved is None)
        if env.is_main:
            log.info("fine-tuning on %d images, %d classes (val: %d) from %s; init: %s", len(tr), len(tr.classes),
                     len(va) if va is not None else 0, cfg.data.path, cfg.init or "none")
        return Training(task, tr, cfg, val_dataset=va, desc="finetune")

    def claimed(self, training: Training, env: DistEnv, out: Path) -> None:
        for split, ds in (("train", training.dataset), ("val", training.val_dataset)):
            if isinstance(ds, ImageFolder):  # a folder (shards and Python datasets are read as they are)
                decode_cache.attach(ds, out / "decode_cache" / split, training.cfg.data.decode_cache)
        if env.is_main:
            (out / "classes.txt").write_text("".join(c + "\n" for c in training.dataset.classes))
            RunDir(out).record_files("classes.txt")  # its SHA-256 in run.json, like every file a run writes

    def outputs(self, training: Training, result: TrainResult) -> dict[str, Callable[[], Any]]:
        out = result.run_dir
        return {"curves.png": run_curves(out, "curves.png", ("loss", "acc", "val_top1", "val_loss", "lr"),
                                         "fine-tuning")}


def run(cfg: FinetuneConfig, out: str | Path, *, resume: bool = False, max_minutes: float = 0.0,
        resume_anyway: bool = False, datasets: tuple[Dataset, Dataset | None] | None = None) -> TrainResult:
    """Fine-tune as ``cfg`` says into run directory ``out`` (``resume_anyway``: accept a changed config).
    ``datasets``: ``(train, val)`` datasets of ``(image, label)`` instead of the folder ``cfg.data.path``
    (``val`` may be None: no evaluation; the label subset options apply to folders only)."""
    return engine.run(Finetuning(datasets), cfg, out, resume=resume, max_minutes=max_minutes,
                      resume_anyway=resume_anyway)
