"""Real images shipped with the package: the Fashion-MNIST test set, written out as ordinary image folders.

The demo, the docs and quick experiments need real images without a network. ``beit/data/embedded/`` holds
the 10,000 test images of Fashion-MNIST (Xiao, Rasul, Vollgraf 2017; MIT licence, Zalando SE: see
``beit/data/embedded/COPYRIGHT``, which must stay next to the files) as the original idx ``.gz`` files
(4.4 MB). :func:`materialize` writes them as PNG folders that every command reads like a user's own data::

    DEST/unlabelled/<class>/NNNNN.png        7,000 images (700 per class): pretraining, tokenizer training
    DEST/labelled/train/<class>/NNNNN.png    2,000 images (200 per class; ``labels_per_class`` keeps fewer)
    DEST/labelled/val/<class>/NNNNN.png      1,000 images (100 per class)
    DEST/seg/images/{train,val}/NNNNN.png    canvases with 2-4 garments pasted on black
    DEST/seg/masks/{train,val}/NNNNN.png     per-pixel class: 0 background, 1..10 = class + 1, 255 ignore

``NNNNN`` is the image's index in the original test set. The unlabelled folder keeps the class sub-folders
only so a reader can browse it; pretraining ignores them (as it ignores any folder tree).

The split is fixed by the package, stratified (1,000 images per class, in the same proportions in every
class) and computed with integer arithmetic only (no random generator whose stream could change between
numpy versions): within a class the images are ordered by a multiplicative hash of their index, the first
700 are unlabelled, the next 200 labelled-train, the last 100 labelled-val. Segmentation canvases use
garments from the train pools (unlabelled + labelled-train) for ``seg/*/train`` and from the val pool for
``seg/*/val``, so no val garment is ever seen in training.

Images are written as **RGB** PNGs although Fashion-MNIST is grayscale: every preset, the ImageNet
normalisation, the tokenizer and the HF/timm interop expect 3 channels, and a folder that looks like a
user's photos exercises exactly the code path the user will run (the loader converts grayscale files to RGB
anyway; writing RGB makes that visible instead of implicit). The 28 px images are **padded** with 2 black
pixels per side to 32 px, not resized: Fashion-MNIST's background is exactly black, so padding adds no
artefact and keeps every pixel sharp; other sizes are padded to 32 and then resized (bicubic).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from .folder import DataError

log = logging.getLogger("beit")

# Folder names sort in label order, so ImageFolder's label i is Fashion-MNIST's class i.
CLASSES = (
    "0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat",
    "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot",
)
CLASS_TITLES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NUM_CLASSES = 10
SEG_IGNORE = 255
PER_CLASS = {"unlabelled": 700, "train": 200, "val": 100}  # of the 1,000 test images per class

_FILES = {
    "images": ("t10k-images-idx3-ubyte.gz", "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
    "labels": ("t10k-labels-idx1-ubyte.gz", "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"),
}
_MANIFEST = "embedded.json"
_FORMAT = 1  # bump when the written layout or content changes: old folders are then rewritten
_EDGE = 16  # garment pixels at or below this value (of 255) are soft edges: label 255 (ignored) in masks


# --------------------------------------------------------------------------------------------- reading


def _read_idx(name: str, sha256: str) -> np.ndarray:
    data = resources.files("beit.data").joinpath("embedded", name).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"the embedded file {name} is damaged (checksum mismatch): reinstall beit")
    raw = gzip.decompress(data)
    # idx format: 2 zero bytes, dtype code 0x08 (uint8), number of dims, then big-endian int32 dims.
    if raw[:3] != b"\x00\x00\x08":
        raise DataError(f"the embedded file {name} is not an idx uint8 file")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images (10000, 28, 28) uint8, labels (10000,) int64)``: the shipped Fashion-MNIST test set."""
    images = _read_idx(*_FILES["images"])
    labels = _read_idx(*_FILES["labels"]).astype(np.int64)
    return images, labels


def split_indices(labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Indices of the ``unlabelled`` / ``train`` / ``val`` parts (sorted), stratified as the module says."""
    if labels is None:
        labels = load_arrays()[1]
    idx = np.arange(len(labels), dtype=np.uint64)
    # Knuth's multiplicative hash: a fixed, well-mixed order that needs no random generator.
    key = (idx * np.uint64(2654435761)) % np.uint64(2**32)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in PER_CLASS}
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        members = members[np.argsort(key[members], kind="stable")]
        start = 0
        for part, n in PER_CLASS.items():
            parts[part].append(members[start: start + n])
            start += n
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def to_size(img28: np.ndarray, size: int) -> np.ndarray:
    """One 28x28 uint8 image -> ``(size, size, 3)`` uint8 RGB (pad to 32 with black, then resize if needed)."""
    a = np.asarray(img28, dtype=np.uint8)
    if size >= 28 and size <= 32:
        lo = (size - 28) // 2
        out = np.zeros((size, size), np.uint8)
        out[lo: lo + 28, lo: lo + 28] = a
    else:
        out = np.zeros((32, 32), np.uint8)
        out[2:30, 2:30] = a
        out = np.asarray(Image.fromarray(out).resize((size, size), Image.BICUBIC))
    return np.repeat(out[..., None], 3, axis=2)


# --------------------------------------------------------------------------------------------- segmentation


def compose_canvas(garments: np.ndarray, classes: np.ndarray, canvas: int, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Paste 28x28 garments on a black ``canvas`` px square; later garments occlude earlier ones.

    Returns ``(image (canvas, canvas) uint8, mask (canvas, canvas) uint8)``: the mask holds ``class + 1``
    where a garment pixel is brighter than the soft-edge level, 255 (ignore) on faint edge pixels that no
    garment covers, 0 on background. Positions are drawn so that boxes overlap by at most a quarter.
    """
    img = np.zeros((canvas, canvas), np.uint8)
    mask = np.zeros((canvas, canvas), np.uint8)
    boxes: list[tuple[int, int]] = []
    for g, c in zip(garments, classes):
        for _ in range(30):
            y, x = (int(v) for v in rng.integers(0, canvas - 28 + 1, size=2))
            overlap = max((max(0, 28 - abs(y - by)) * max(0, 28 - abs(x - bx)) for by, bx in boxes), default=0)
            if overlap <= 28 * 28 // 4:
                break
        boxes.append((y, x))
        region_img, region_mask = img[y: y + 28, x: x + 28], mask[y: y + 28, x: x + 28]
        solid, faint = g > _EDGE, (g > 0) & (g <= _EDGE)
        region_img[solid] = g[solid]
        region_img[faint] = np.maximum(region_img[faint], g[faint])
        region_mask[solid] = c + 1
        region_mask[faint & (region_mask == 0)] = SEG_IGNORE
    return img, mask


# --------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class EmbeddedData:
    """Where :func:`materialize` wrote each part (folders ready for ``--data`` / ``--train`` / ``--val``)."""

    root: Path

    @property
    def unlabelled(self) -> Path:
        return self.root / "unlabelled"

    @property
    def train(self) -> Path:
        return self.root / "labelled" / "train"

    @property
    def val(self) -> Path:
        return self.root / "labelled" / "val"

    @property
    def seg(self) -> Path:
        return self.root / "seg"

    def counts(self) -> dict[str, int]:
        return json.loads((self.root / _MANIFEST).read_text())["counts"]


def _save(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, compress_level=1)  # tiny files; fast beats 10% smaller


def _write_classified(folder: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, size: int) -> int:
    for c in CLASSES:
        (folder / c).mkdir(parents=True, exist_ok=True)
    for i in indices:
        _save(to_size(images[i], size), folder / CLASSES[labels[i]] / f"{i:05d}.png")
    return len(indices)


def _first_per_class(indices: np.ndarray, labels: np.ndarray, k: int | None) -> np.ndarray:
    if k is None:
        return indices
    return np.sort(np.concatenate([indices[labels[indices] == c][:k] for c in range(NUM_CLASSES)]))


def _already_written(root: Path, manifest: Path, params: dict) -> bool:
    """True if ``root`` holds our folders written with ``params``; folders of ours written with other
    params are removed; folders of someone else's are an error."""
    ours = ("unlabelled", "labelled", "seg")
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("params") == params:
            return True
        manifest.unlink()
        for name in ours:
            if (root / name).exists():
                shutil.rmtree(root / name)
        return False
    clash = [name for name in ours if (root / name).exists()]
    if clash:
        raise DataError(f"{root / clash[0]} exists and was not written by beit's embedded data: "
                        "choose an empty or new folder")
    return False


def _write_segmentation(seg: Path, images: np.ndarray, labels: np.ndarray, split: dict, counts: dict[str, int],
                        size: int, seed: int) -> dict[str, int]:
    """``counts[part]`` canvases of 2 to 4 garments per part (train from the unlabelled and train images,
    val from the val images), as ``seg/images/PART/j.png`` and ``seg/masks/PART/j.png``."""
    rng = np.random.default_rng(seed)
    pools = {"train": np.concatenate([split["unlabelled"], split["train"]]), "val": split["val"]}
    for part, n in counts.items():
        (seg / "images" / part).mkdir(parents=True, exist_ok=True)
        (seg / "masks" / part).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            pick = rng.choice(pools[part], size=int(rng.integers(2, 5)), replace=False)
            img, mask = compose_canvas(images[pick], labels[pick], size, rng)
            _save(np.repeat(img[..., None], 3, axis=2), seg / "images" / part / f"{j:05d}.png")
            _save(mask, seg / "masks" / part / f"{j:05d}.png")
    return {f"seg_{part}": n for part, n in counts.items()}


def materialize(
    dest: str | Path,
    *,
    size: int = 32,
    unlabelled_per_class: int | None = None,
    labels_per_class: int | None = None,
    val_per_class: int | None = None,
    seg_train: int = 800,
    seg_val: int = 200,
    seg_size: int = 64,
    seed: int = 0,
) -> EmbeddedData:
    """Write the shipped images under ``dest`` as PNG folders (layout in the module docstring).

    ``size``: side of the classification images (32: padded; see the module docstring).
    ``unlabelled_per_class`` / ``labels_per_class`` / ``val_per_class``: keep only the first k images per
    class of that part (in the fixed split order; ``None`` keeps all 700 / 200 / 100), for quick runs and
    few-label studies. ``seg_train`` / ``seg_val``: number of segmentation canvases of ``seg_size`` px
    (0 writes no segmentation set); ``seed`` fixes their composition.

    Idempotent: a folder written with the same arguments is reused as it is (``DEST/embedded.json``
    records them); one written with other arguments is replaced. Folders it did not write are never
    touched: if ``DEST/unlabelled``, ``DEST/labelled`` or ``DEST/seg`` exist without that record, it stops
    with a :class:`DataError`.
    """
    root = Path(dest).expanduser()
    params = {"format": _FORMAT, "size": size, "unlabelled_per_class": unlabelled_per_class,
              "labels_per_class": labels_per_class, "val_per_class": val_per_class, "seg_train": seg_train,
              "seg_val": seg_val, "seg_size": seg_size, "seed": seed}
    for k in ("unlabelled_per_class", "labels_per_class", "val_per_class"):
        v = params[k]
        if v is not None and v < 1:
            raise DataError(f"{k} must be >= 1 (or None for all), got {v}")
    if size < 8:
        raise DataError(f"size must be >= 8 px, got {size}")
    if seg_size < 28 and (seg_train or seg_val):
        raise DataError(f"seg_size must be >= 28 px (one garment), got {seg_size}")
    data = EmbeddedData(root)
    manifest = root / _MANIFEST
    if _already_written(root, manifest, params):
        return data

    images, labels = load_arrays()
    split = split_indices(labels)
    root.mkdir(parents=True, exist_ok=True)
    # Claim the folder first: a run that dies half-way leaves this record without params, so the next call
    # knows the folders are its own and rewrites them.
    manifest.write_text(json.dumps({"params": None, "status": "writing"}))
    counts = {
        "unlabelled": _write_classified(data.unlabelled, images, labels,
                                        _first_per_class(split["unlabelled"], labels, unlabelled_per_class), size),
        "train": _write_classified(data.train, images, labels,
                                   _first_per_class(split["train"], labels, labels_per_class), size),
        "val": _write_classified(data.val, images, labels,
                                 _first_per_class(split["val"], labels, val_per_class), size),
    }
    if seg_train or seg_val:
        counts.update(_write_segmentation(data.seg, images, labels, split, {"train": seg_train, "val": seg_val},
                                          seg_size, seed))
    notice = resources.files("beit.data").joinpath("embedded", "COPYRIGHT").read_text()
    (root / "COPYRIGHT-fashion-mnist").write_text(notice)
    manifest.write_text(json.dumps({"params": params, "counts": counts, "classes": list(CLASSES)}, indent=1))
    log.info("wrote Fashion-MNIST folders to %s: %s", root, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return data


__all__ = ["CLASSES", "CLASS_TITLES", "NUM_CLASSES", "SEG_IGNORE", "EmbeddedData", "compose_canvas",
           "load_arrays", "materialize", "split_indices", "to_size"]
