"""Embeddings of a folder of images: ``beit embed --init RUN_OR_EXPORT --data FOLDER --out FILE.npy``.

One pooled vector per image from a frozen backbone, with the block and pooling choices of ``beit probe``
(:func:`beit.tasks.probe.pooled_features`: ``layer`` is a 0-based block index, ``-1`` the last, taken before
the final LayerNorm; ``pool`` is ``mean``, ``cls``, ``grid`` or ``tokens``), so a kNN on the written vectors
gives what ``beit probe knn`` reports for that block and pooling. Images go through the model's own
evaluation transform (:func:`beit.transform_for`: size, crop and normalisation recorded with the run).

Output: ``FILE.npy`` (float32, ``(N, D)``, row ``i`` is image ``i``) and ``FILE.csv`` (``row,path,label,class``;
label -1 and class empty when the folder has no class sub-folders). Why this pair: numpy is already a
dependency, ``np.load(FILE, mmap_mode="r")`` reads a slice of a large file without loading it, and every tool
reads CSV; Parquet would need pyarrow, which this project does not otherwise need. Unreadable images are
skipped with a warning (their rows are not written), never replaced by another image.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..config import ConfigError, check_fields, resolve
from ..data.folder import DataError, list_images, load_image
from ..loading import load
from ..models.vit import VisionTransformer
from ..preprocess import transform_for
from .probe import parse_layers, pool_names, pooled_features

log = logging.getLogger("beit")

__all__ = ["EmbedConfig", "Embeddings", "build_config", "embed", "run"]


@dataclass
class EmbedConfig:
    init: str = ""  # anything beit.load reads: a run, a checkpoint, an HF or timm export
    data: str = ""  # a folder of images; <class>/ sub-folders give labels
    layer: int = -1  # 0-based block index (-1: the last), taken before the final LayerNorm (as beit probe)
    pool: str = "mean"  # mean | cls | grid | tokens (one of beit probe's poolings)
    grid: int = 4  # pool=grid: grid x grid cells
    img_size: int = 0  # 0: the model's input size
    crop_pct: float = 0.0  # 0: the model's (model.pretrained_cfg); else resize to img_size / crop_pct, then crop
    batch_size: int = 64
    num_workers: int = 2
    device: str = "auto"

    def __post_init__(self) -> None:
        if len(pool_names(self.pool)) != 1:
            raise ConfigError(f"embed: pool must be one pooling (mean, cls, grid or tokens), got {self.pool!r}")
        check_fields(self, "embed", {"batch_size grid": "size", "img_size num_workers": "count"})
        if not 0.0 <= self.crop_pct <= 1.0:
            raise ConfigError(f"embed.crop_pct must be in (0, 1] (0: the model's), got {self.crop_pct}")


def build_config(config: str | None = None, overrides: list[str] | dict | None = None) -> EmbedConfig:
    return resolve(EmbedConfig, None, None, config, overrides)


@dataclass
class Embeddings:
    """``features`` ``(N, D)`` float32, one row per image of ``paths``; ``labels`` (-1: none) index ``classes``."""

    features: np.ndarray
    paths: list[str]
    labels: np.ndarray
    classes: list[str]


class _Images(Dataset):
    """``(image tensor, index, readable)``: an unreadable image gives a zero tensor and ``readable=False``, so
    its row is dropped afterwards rather than filled with another image (ImageFolder's fallback)."""

    def __init__(self, paths: list[Path], transform, shape: tuple[int, ...]) -> None:
        self.paths, self.transform, self.shape = paths, transform, shape

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = load_image(self.paths[i])  # warns once for an unreadable file
        if img is None:
            return torch.zeros(self.shape), i, False
        return self.transform(img), i, True


def _labelled(root: Path, paths: list[Path]) -> list[str]:
    """The class names when every image lies in a class sub-folder of ``root``, else ``[]``."""
    tops = [p.relative_to(root).parts for p in paths]
    if not tops or any(len(t) < 2 for t in tops):
        return []
    return sorted({t[0] for t in tops})


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


@torch.no_grad()
def embed(cfg: EmbedConfig, progress: bool = True) -> Embeddings:
    """The embeddings of every image under ``cfg.data`` (see the module doc)."""
    if not cfg.init or not cfg.data:
        raise ConfigError("embed needs --init (a run or export) and --data (a folder of images)")
    model = load(cfg.init, **({"img_size": cfg.img_size} if cfg.img_size else {}))
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"--init {cfg.init}: not a vision transformer (a tokenizer?)")
    root = Path(cfg.data)
    if not root.is_dir():
        raise DataError(f"--data {root}: no such folder")
    paths = list_images(root)
    if not paths:
        raise DataError(f"--data {root}: no images found")
    classes = _labelled(root, paths)
    if classes and set(classes) <= {"train", "val", "test"} and all(len(p.relative_to(root).parts) > 2 for p in paths):
        log.warning("%s holds the splits %s: they are taken as the labels; embed one split (--data %s/train) "
                    "for its classes", root, "/".join(classes), root)
    layer = parse_layers(str(cfg.layer), model.num_layers)
    pool = pool_names(cfg.pool)
    tf = transform_for(model, **({"crop_pct": cfg.crop_pct} if cfg.crop_pct else {}))
    device = _device(cfg.device)
    model.eval().to(device)
    ds = _Images(paths, tf, (model.cfg.in_chans, *model.cfg.img_hw))
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
    feats, keep = [], []
    log.info("embedding %d images of %s: block %d, %s pooling", len(paths), root, layer[0], pool[0])
    for images, idx, ok in tqdm(loader, desc="embed", unit="batch", disable=not progress, dynamic_ncols=True):
        f = pooled_features(model, images.to(device), layer, pool, cfg.grid)[(layer[0], pool[0])]
        feats.append(f.float().cpu()[ok])
        keep += idx[ok].tolist()
    if not keep:
        raise DataError(f"--data {root}: none of the {len(paths)} images could be read")
    kept = [paths[i] for i in keep]
    labels = np.array([classes.index(p.relative_to(root).parts[0]) if classes else -1 for p in kept], dtype=np.int64)
    return Embeddings(torch.cat(feats).numpy(), [str(p) for p in kept], labels, classes)


def save(emb: Embeddings, out: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``out`` (``.npy``) and its index ``.csv``; existing files are refused unless ``overwrite``."""
    npy = Path(out)
    if npy.suffix != ".npy":
        raise ConfigError(f"--out {npy}: give a .npy file name (the index goes next to it as .csv)")
    index = npy.with_suffix(".csv")
    held = [p for p in (npy, index) if p.exists()]
    if held and not overwrite:
        raise FileExistsError(f"{held[0]} exists: choose another --out or pass --overwrite")
    npy.parent.mkdir(parents=True, exist_ok=True)
    np.save(npy, emb.features)
    with open(index, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["row", "path", "label", "class"])
        for i, (p, y) in enumerate(zip(emb.paths, emb.labels.tolist())):
            w.writerow([i, p, y, emb.classes[y] if y >= 0 else ""])
    return npy, index


def run(cfg: EmbedConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Embed and write ``out`` + its index; the JSON-able summary."""
    if Path(out).exists() and not overwrite:  # before the (slow) extraction
        raise FileExistsError(f"{out} exists: choose another --out or pass --overwrite")
    emb = embed(cfg, progress)
    npy, index = save(emb, out, overwrite)
    return {"out": str(npy), "index": str(index), "images": len(emb.paths), "dim": int(emb.features.shape[1]),
            "classes": len(emb.classes), "layer": cfg.layer, "pool": cfg.pool}
