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
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .. import recipes
from ..config import (
    ConfigError,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    check_fields,
    dump_yaml,
    from_dict,
    resolve,
    to_dict,
)
from ..data.folder import DataError, ImageFolder
from ..data.shards import open_images
from ..data.views import to_rgb_pil
from ..engine import TrainResult, finish_run, start_run, train
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

log = logging.getLogger("beit")

__all__ = [
    "PRESETS",
    "ClassificationTask",
    "FinetuneConfig",
    "FinetuneDataConfig",
    "LabelledDataset",
    "balanced_subset",
    "build_config",
    "labelled_splits",
    "run",
]


@dataclass
class FinetuneDataConfig:
    path: str = ""  # DIR with train/<class>/ and val/<class>/
    labels_per_class: int = 0  # keep N training images per class (balanced, seeded); 0: all
    label_fraction: float = 0.0  # or keep this fraction of each class (0: all)

    def __post_init__(self) -> None:
        check_fields(self, "data", {"labels_per_class": "count", "label_fraction": "prob"})


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


# --------------------------------------------------------------------------------------------- data


def balanced_subset(targets: list[int], *, labels_per_class: int = 0, label_fraction: float = 0.0,
                    seed: int = 0) -> list[int]:
    """Indices of a class-balanced subset: ``labels_per_class`` per class (all of a smaller class) or
    ``ceil(label_fraction * n_c)`` (at least 1) per class, chosen by a permutation seeded by ``seed``.
    Sorted; the same seed always gives the same subset."""
    if labels_per_class and label_fraction:
        raise ConfigError("give either data.labels_per_class or data.label_fraction, not both")
    if labels_per_class < 0 or not 0.0 <= label_fraction <= 1.0:
        raise ConfigError("data.labels_per_class must be >= 0 and data.label_fraction in [0, 1]")
    if not labels_per_class and not label_fraction:
        return list(range(len(targets)))
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    keep: list[int] = []
    for c in sorted(by_class):
        idx = by_class[c]
        g = torch.Generator().manual_seed(seed * 1_000_003 + c)
        perm = torch.randperm(len(idx), generator=g).tolist()
        n = labels_per_class if labels_per_class else max(1, math.ceil(label_fraction * len(idx)))
        keep.extend(idx[j] for j in perm[: min(n, len(idx))])
    return sorted(keep)


def labelled_splits(path: str | Path, train_transform, val_transform, *, labels_per_class: int = 0,
                    label_fraction: float = 0.0, seed: int = 0) -> tuple[ImageFolder, ImageFolder]:
    """``(train, val)`` ImageFolders of ``path/train/<class>/`` and ``path/val/<class>/`` with the same
    classes; the training split reduced to a balanced subset if asked."""
    if not path:
        raise ConfigError("give the dataset: --data DIR (with train/<class>/ and val/<class>/)")
    root = Path(path)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{root} has no {split}/ folder: expected {root}/train/<class>/ and {root}/val/<class>/")
    tr = open_images(root / "train", transform=train_transform, with_labels=True)  # class folders, shards or HF
    va = open_images(root / "val", transform=val_transform, with_labels=True)
    if tr.classes != va.classes:
        extra = sorted(set(va.classes) ^ set(tr.classes))
        raise DataError(f"{root}: train/ and val/ have different class folders (e.g. {extra[:3]})")
    present = sorted({tr.classes[t] for t in tr.targets})
    if len(present) < 2:
        raise DataError(f"{root}/train has only one class with images ({present[0]}): classifying needs at least "
                        "two class folders (with one, every prediction is right and the accuracy says nothing)")
    if labels_per_class:
        counts = [tr.targets.count(tr.class_to_idx[c]) for c in present]
        if labels_per_class > min(counts):
            log.warning("--labels-per-class %d: the training data has fewer (%d to %d images per class); classes "
                        "with fewer use all of theirs", labels_per_class, min(counts), max(counts))
    keep = balanced_subset(tr.targets, labels_per_class=labels_per_class, label_fraction=label_fraction, seed=seed)
    if len(keep) < len(tr.samples):
        tr.samples = [tr.samples[i] for i in keep]
        log.info("using %d of the training images (balanced over %d classes)", len(keep), len(tr.classes))
    return tr, va


# --------------------------------------------------------------------------------------------- the task


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> list[int]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at the classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (B, kmax)
    hit = top == labels.view(-1, 1)  # (B, kmax)
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


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


class LabelledDataset(Dataset):
    """A user's dataset of ``(image, label)`` items (PIL image or ``(3|1, H, W)`` tensor) through ``transform``;
    ``classes``: the dataset's own ``classes`` if it has them, else the label values as names."""

    def __init__(self, base: Dataset, transform, classes: list[str] | None = None) -> None:
        self.base, self.transform = base, transform
        if classes is None:
            classes = getattr(base, "classes", None)
        if not classes:
            targets = getattr(base, "targets", None)
            if targets is None:
                targets = [int(base[i][1]) for i in range(len(base))]  # type: ignore[arg-type]
            classes = [str(i) for i in range(int(max(targets)) + 1)]
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        img, label = self.base[i][:2]
        return self.transform(to_rgb_pil(img)), int(label)


def run(cfg: FinetuneConfig, out: str | Path, *, resume: bool = False, max_minutes: float = 0.0,
        resume_anyway: bool = False, datasets: tuple[Dataset, Dataset | None] | None = None) -> TrainResult:
    """Fine-tune as ``cfg`` says into run directory ``out`` (``resume_anyway``: accept a changed config).
    ``datasets``: ``(train, val)`` datasets of ``(image, label)`` instead of the folder ``cfg.data.path``
    (``val`` may be None: no evaluation; the label subset options apply to folders only)."""
    env = start_run(cfg.train)
    size = cfg.model.img_size
    if datasets is None:
        tr, va = labelled_splits(cfg.data.path, build_train_transform(cfg.aug, size),
                                 build_eval_transform(cfg.aug, size), labels_per_class=cfg.data.labels_per_class,
                                 label_fraction=cfg.data.label_fraction, seed=cfg.train.seed)
    else:
        tr = LabelledDataset(datasets[0], build_train_transform(cfg.aug, size))
        va = (LabelledDataset(datasets[1], build_eval_transform(cfg.aug, size), tr.classes)
              if datasets[1] is not None else None)
    saved = resumed_model_config(out, resume)
    if saved is not None:
        cfg = dataclasses.replace(cfg, model=saved)
    task, cfg = build_task(cfg, len(tr.classes), init=saved is None)
    if env.is_main:
        log.info("fine-tuning on %d images, %d classes (val: %d) from %s; init: %s", len(tr), len(tr.classes),
                 len(va) if va is not None else 0, cfg.data.path, cfg.init or "none")
        RunDir(out).claim("finetune", resume)  # before classes.txt: never written into a folder of the user's
        (Path(out) / "classes.txt").write_text("".join(c + "\n" for c in tr.classes))
        RunDir(out).record_files("classes.txt")  # its SHA-256 in run.json, like every file a run writes
    res = train(task, tr, train_cfg=cfg.train, optim_cfg=cfg.optim, run_dir=out, config_yaml=dump_yaml(cfg),
                resume=resume, val_dataset=va, desc="finetune", max_minutes=max_minutes, env=env,
                resume_anyway=resume_anyway)
    finish_run(env, {"curves.png": run_curves(out, "curves.png", ("loss", "acc", "val_top1", "val_loss", "lr"),
                                              "fine-tuning")}, res)
    return res
