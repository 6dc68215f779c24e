"""The tokenizer's dataset: a folder (or any dataset) of PIL images -> ``(3, S, S)`` float tensors in [0, 1],
the shorter side resized to ``S``, randomly (training) or centrally cropped; labels, if any, ignored.

Used by tokenizer training (:mod:`beit.tokenizers.train`, every objective: :class:`TokenizerDataConfig`,
:func:`resolve_data`, :func:`training_datasets`) and ``beit tokenizer eval`` (:mod:`beit.tokenizers.evaluate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset, Subset

from ..config import ConfigError, check_fields
from .folder import ImageFolder

__all__ = ["TokenizerDataConfig", "build_dataset", "image_transform", "resolve_data", "training_datasets"]


@dataclass
class TokenizerDataConfig:
    path: str = ""  # a folder tree of images (labels, if any, are ignored)
    val_path: str = ""  # optional held-out folder: evaluated (psnr, codebook usage) each epoch and at the end
    limit: int = 0  # use only the first N images in sorted order (0: all)
    val_limit: int = 0
    hflip: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "data", {"limit val_limit": "count"})


class _FitShorterSide:
    """Resize (antialiased) so the shorter side is ``size``; untouched if it already is."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img):
        from torchvision.transforms import functional as TF

        if min(img.size) == self.size:
            return img
        return TF.resize(img, self.size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)


def image_transform(img_size: int, train: bool, hflip: bool = True):
    """PIL -> (3, img_size, img_size) float in [0, 1]: shorter side to img_size, random (train) or centre crop."""
    from torchvision import transforms as T

    ops: list = [_FitShorterSide(img_size)]
    if train:
        ops.append(T.RandomCrop(img_size))
        if hflip:
            ops.append(T.RandomHorizontalFlip())
    else:
        ops.append(T.CenterCrop(img_size))
    ops.append(T.ToTensor())
    return T.Compose(ops)


class _Transformed(Dataset):
    """Any dataset yielding PIL images or ``(image, label)``: applies ``transform`` to the image only."""

    def __init__(self, dataset: Dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if isinstance(item, (tuple, list)):
            item = item[0]
        return self.transform(item)


def build_dataset(data: str | Path | Dataset, img_size: int, train: bool, hflip: bool = True,
                  limit: int = 0) -> Dataset:
    """A folder path (:class:`beit.data.ImageFolder`) or any dataset of PIL images -> (3, S, S) tensors."""
    tf = image_transform(img_size, train, hflip)
    if isinstance(data, (str, Path)):
        ds: Dataset = ImageFolder(data, transform=tf)
    else:
        ds = _Transformed(data, tf)
    if limit and limit < len(ds):  # type: ignore[arg-type]
        ds = Subset(ds, range(limit))
    return ds


def resolve_data(cfg, data_dir: str | Path | Dataset | None, val_dir: str | Path | Dataset | None,
                 steps: int | None) -> tuple[str | Path | Dataset, str | Path | Dataset | None]:
    """The run's training and held-out images (every tokenizer objective's run): ``data_dir``/``val_dir``
    (folders or datasets) over ``data.path``/``data.val_path``, ``steps`` over ``train.steps``; folder paths are
    written back into ``cfg`` so that its ``config.yaml`` says what ran."""
    if steps is not None:
        cfg.train.steps = int(steps)
    data: str | Path | Dataset = data_dir if data_dir is not None else cfg.data.path
    if isinstance(data, (str, Path)):
        if not str(data):
            raise ConfigError("tokenizer training needs data: a folder of images (data.path / --data)")
        cfg.data.path = str(data)
    val: str | Path | Dataset | None = val_dir if val_dir is not None else (cfg.data.val_path or None)
    if isinstance(val, (str, Path)):
        cfg.data.val_path = str(val)
    return data, val


def training_datasets(cfg, data, val) -> tuple[Dataset, Dataset | None]:
    """The augmented training set and the plain held-out set at the tokenizer's input size."""
    size = cfg.model.img_size
    dataset = build_dataset(data, size, train=True, hflip=cfg.data.hflip, limit=cfg.data.limit)
    val_ds = build_dataset(val, size, train=False, limit=cfg.data.val_limit) if val is not None else None
    return dataset, val_ds
