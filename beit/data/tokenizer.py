"""The tokenizer's dataset: a folder (or any dataset) of PIL images -> ``(3, S, S)`` float tensors in [0, 1],
the shorter side resized to ``S``, randomly (training) or centrally cropped; labels, if any, ignored.

Used by tokenizer training (:mod:`beit.tokenizers.train`) and ``beit tokenizer eval``
(:mod:`beit.tokenizers.evaluate`).
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset, Subset

from .folder import ImageFolder

__all__ = ["build_dataset", "image_transform"]


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
