"""Labelled images for the downstream tasks: ``(train, val)`` splits of a class-folder tree, the seeded
class-balanced subsets of few-label training (fine-tuning, the probes, pretraining's online probe), and a
user's dataset of ``(image, label)`` items through a transform."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..config import ConfigError
from .folder import DataError, ImageFolder
from .shards import open_images
from .views import to_rgb_pil

log = logging.getLogger("beit")

__all__ = ["LabelledDataset", "balanced_subset", "labelled_splits"]


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
