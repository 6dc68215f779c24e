"""Segmentation folders: ``root/images/<split>/`` with single-channel PNG label maps of the same name under
``root/masks/<split>/`` (a label is a class index, :data:`IGNORE_INDEX` = 255 is ignored), the masks read as
``(H, W)`` uint8, and the joint transform of image and mask (one crop and flip for both)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode

from ..config import image_hw
from .folder import DataError, append_skipped, default_max_pixels, header_problems, list_images, load_image
from .views import IMAGENET_MEAN, IMAGENET_STD, random_resized_crop_params

log = logging.getLogger("beit")

IGNORE_INDEX = 255  # the label of pixels no class is scored on

__all__ = ["IGNORE_INDEX", "SegTransform", "SegmentationFolder", "load_mask"]


def load_mask(path: str | Path) -> np.ndarray:
    """A PNG label map as ``(H, W)`` uint8 class indices (mode L or P; P gives the palette indices)."""
    try:
        with Image.open(path) as m:
            m.load()
            if m.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"{path}: a mask must be a single-channel label map (mode L or P), got mode {m.mode}")
            a = np.asarray(m)
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: unreadable mask ({e})") from None
    if a.max(initial=0) > 255:
        raise DataError(f"{path}: labels above 255")
    return a.astype(np.uint8)


class SegTransform:
    """``(PIL image, (H, W) uint8 mask) -> {"images": (3, h, w) normalised, "masks": (h, w) int64}``.

    ``size``: ``(h, w)``, or one side for squares. ``train=True``: one random resized crop (aspect ratio
    within 3/4..4/3 of ``w / h``) and flip for both (bicubic image, nearest mask); else a plain resize to
    ``h x w``. Draws from torch's global RNG (seeded per sample by the engine).
    """

    def __init__(self, size: int | tuple[int, int], train: bool, scale: Sequence[float] = (0.25, 1.0),
                 hflip: float = 0.5, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.size, self.train = image_hw(size), train
        self.scale, self.hflip = (float(scale[0]), float(scale[1])), hflip
        self.mean, self.std = list(mean), list(std)

    def __call__(self, img: Image.Image, mask: np.ndarray) -> dict[str, torch.Tensor]:
        m = torch.from_numpy(np.ascontiguousarray(mask))[None]  # (1, H, W) uint8
        x = TF.pil_to_tensor(img)  # (3, H, W) uint8
        S = list(self.size)
        if self.train:
            aspect = S[1] / S[0]
            top, left, h, w = random_resized_crop_params(x.shape[1], x.shape[2], self.scale,
                                                         (3 / 4 * aspect, 4 / 3 * aspect))
            x = TF.resized_crop(x, top, left, h, w, S, interpolation=InterpolationMode.BICUBIC, antialias=True)
            m = TF.resized_crop(m, top, left, h, w, S, interpolation=InterpolationMode.NEAREST)
            if float(torch.rand(())) < self.hflip:
                x, m = x.flip(-1), m.flip(-1)
        else:
            x = TF.resize(x, S, interpolation=InterpolationMode.BICUBIC, antialias=True)
            m = TF.resize(m, S, interpolation=InterpolationMode.NEAREST)
        x = TF.normalize(x.float() / 255.0, self.mean, self.std)
        return {"images": x, "masks": m[0].long()}


class SegmentationFolder(Dataset):
    """``root/images/<split>/**/name.ext`` with ``root/masks/<split>/**/name.png`` -> transformed dicts.

    An unreadable image is left out when the folder is read (:func:`beit.data.folder.header_problem`, listed in
    ``skipped``), never replaced by another; one that fails only when drawn gives ``None`` (dropped from its
    batch by :class:`~beit.data.folder.DropUnreadable`)."""

    def __init__(self, root: str | Path, split: str, transform: SegTransform | None = None) -> None:
        root = Path(root)
        img_dir, mask_dir = root / "images" / split, root / "masks" / split
        for d in (img_dir, mask_dir):
            if not d.is_dir():
                raise DataError(f"{d} does not exist: segmentation data needs {root}/images/{{train,val}}/ "
                                f"and {root}/masks/{{train,val}}/")
        self.samples: list[tuple[Path, Path]] = []
        for p in list_images(img_dir):
            m = (mask_dir / p.relative_to(img_dir)).with_suffix(".png")
            if not m.is_file():
                raise DataError(f"no mask for {p} (expected {m})")
            self.samples.append((p, m))
        if not self.samples:
            raise DataError(f"no images under {img_dir}")
        problems = header_problems([ip for ip, _ in self.samples])
        self.skipped = [(ip, r) for (ip, _), r in zip(self.samples, problems) if r]
        self.samples = [s for s, r in zip(self.samples, problems) if not r]
        shown = "; ".join(f"{p.relative_to(img_dir)}: {r}" for p, r in self.skipped[:3])
        if not self.samples:
            raise DataError(f"none of the {len(self.skipped)} images under {img_dir} could be read ({shown})")
        if self.skipped:
            log.warning("skipping unreadable image(s) under %s: %d of %d files are left out (%s)", img_dir,
                        len(self.skipped), len(self.skipped) + len(self.samples), shown)
        self.transform = transform
        self.skip_log: Path | None = None  # beit.data.folder.write_skip_list sets it: later finds go there
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray] | None:
        """The image and mask at ``index``, or None if the image cannot be decoded now (never another one)."""
        ip, mp = self.samples[index]
        if index in self._bad:
            return None
        img = load_image(ip)
        if img is None:
            self._bad.add(index)
            if self.skip_log is not None:
                append_skipped(self.skip_log, [(ip, "could not be decoded when drawn")])
            return None
        mask = load_mask(mp)
        if mask.shape != (img.height, img.width) and mask.size > default_max_pixels():
            # a huge image was decoded downscaled (beit.data.folder.load_image): its mask follows it
            mask = np.asarray(Image.fromarray(mask).resize(img.size, Image.NEAREST))
        if mask.shape != (img.height, img.width):
            raise DataError(f"{mp}: mask is {mask.shape[1]}x{mask.shape[0]}, image {ip} is {img.width}x{img.height}")
        return img, mask

    def __getitem__(self, index: int):
        loaded = self.load(index)
        if loaded is None:
            return None
        img, mask = loaded
        if self.transform is None:
            return img, mask
        return self.transform(img, mask)

    def max_label(self) -> int:
        """Largest label (ignoring 255) over all masks."""
        top = -1
        for _, mp in self.samples:
            u = np.unique(load_mask(mp))
            u = u[u != IGNORE_INDEX]
            if len(u):
                top = max(top, int(u.max()))
        return top
