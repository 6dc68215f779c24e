"""Sharded image datasets: WebDataset tar shards and local HF ``datasets`` directories.

Both are read by **random access**, not as a stream: opening a shard set builds an index of where every
sample lies (tar member offsets, read from the tar headers only; Arrow rows), and ``dataset[i]`` seeks to
sample ``i``. The engine's sampler then does for shards exactly what it does for folders: one seeded
permutation per epoch, each rank takes its share of every global batch, each DataLoader worker builds the
batches it is handed, and a resumed run continues with the next unseen samples of the same epoch. A
streaming reader (a shuffle buffer per worker) cannot give those guarantees; on local disks the seek per
sample costs less than decoding the image.

Layouts (what ``beit data pack`` writes, and what WebDataset tools write):

- tar shards: ``train-{000000..000009}.tar`` (a brace range or list), a text file listing shard paths
  one a line, a single ``.tar``, or a folder holding ``*.tar``. Members are grouped into samples by key (the
  name up to the first dot of its last path part: ``0042.jpg`` and ``0042.cls`` are sample ``0042``); the
  image is the member with an image extension, the label the integer in ``.cls``. Class names come from
  ``classes.txt`` beside the shards when present.
- an HF ``datasets`` directory (``Dataset.save_to_disk``): an image column (``image`` or ``img``) and,
  optionally, a label column (``label`` or ``labels``, its ``ClassLabel`` names are the class names).
"""

from __future__ import annotations

import io
import logging
import os
import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from .folder import IMAGE_EXTENSIONS, DataError, ImageFolder, default_max_pixels, load_image

logger = logging.getLogger(__name__)

_BRACE = re.compile(r"\{([^{}]*)\}")
_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar, a-001.tar, a-002.tar``; ``{x,y}`` lists; several groups nest.
    A numeric range keeps the width of its first bound (zero padding)."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        if hi < lo:
            raise DataError(f"shard pattern {pattern!r}: the range {{{body}}} counts down")
        items = [str(i).zfill(len(r.group(1))) for i in range(lo, hi + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def is_hf_dataset_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "state.json").is_file() and (p / "dataset_info.json").is_file()


def shard_paths(spec: str | Path) -> list[Path] | None:
    """The tar shards ``spec`` names (brace pattern, list file, one ``.tar``, a folder of ``*.tar``), or None
    when ``spec`` is not a shard set (a folder of images)."""
    s = str(spec)
    if "{" in s:
        paths = [Path(p) for p in expand_braces(s)]
    elif s.endswith(".tar"):
        paths = [Path(s)]
    elif Path(s).is_file() and s.endswith((".txt", ".shards")):
        base = Path(s).parent
        lines = [ln.strip() for ln in Path(s).read_text(encoding="utf-8").splitlines()]
        paths = [p if p.is_absolute() else base / p for p in (Path(ln) for ln in lines if ln and not ln.startswith("#"))]
    elif Path(s).is_dir() and any(Path(s).glob("*.tar")) and not any(
            e.is_dir() for e in os.scandir(s) if not e.name.startswith(".")):
        paths = sorted(Path(s).glob("*.tar"))
    else:
        return None
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} of the {len(paths)} shards of {s} do not exist, e.g. {missing[0]}")
    if not paths:
        raise DataError(f"{s} names no shards")
    return paths


class _Named(io.BytesIO):
    """Bytes of one member, printed as ``shard.tar:member`` in warnings about it."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.label = name

    def __str__(self) -> str:
        return self.label


class _Sharded(Dataset):
    """What the folder dataset offers the tasks: ``classes``, ``targets``, ``samples``, ``load(i)``,
    ``dataset[i]`` = ``transform(image)`` or ``(that, label)`` with ``with_labels``."""

    root: Path
    classes: list[str]
    samples: list[tuple[Any, int]]

    def __init__(self, transform: Callable[[Image.Image], Any] | None, with_labels: bool,
                 max_pixels: int | None) -> None:
        self.transform, self.with_labels = transform, with_labels
        self.max_pixels = max_pixels or default_max_pixels()
        self.cache = None  # no decode cache: shards are for data sets too large to decode once
        self.decoder: Callable[[Any, int], Any] = load_image  # or beit.data.decode.decode_tensor (data.decode=fast)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, ref: Any) -> Image.Image | None:
        raise NotImplementedError

    def load(self, index: int) -> tuple[Any, int]:
        """The image at ``index`` with its label; ``(None, label)`` if it cannot be decoded (warned naming the
        member): never another sample in its place (the loader's collate drops it from the batch)."""
        ref, target = self.samples[index]
        return self.image(ref), target

    def __getitem__(self, index: int) -> Any:
        img, target = self.load(index)
        if img is None:
            return None
        x = self.transform(img) if self.transform is not None else img
        return (x, target) if self.with_labels else x


class TarShards(_Sharded):
    """WebDataset-layout tar shards, indexed once (headers only) and read by seeking to each member."""

    def __init__(self, shards: list[Path], transform: Callable[[Image.Image], Any] | None = None,
                 with_labels: bool = False, max_pixels: int | None = None) -> None:
        super().__init__(transform, with_labels, max_pixels)
        self.shards = list(shards)
        self.root = self.shards[0].parent
        self.samples = []  # ((shard index, data offset, size, member name), label)
        no_image = 0
        for si, shard in enumerate(self.shards):
            found, n = self._index(si, shard)
            self.samples += found
            no_image += n
        if no_image:
            logger.warning("%d sample key(s) in the shards have no image member and are left out", no_image)
        if not self.samples:
            raise DataError(f"no images found in the {len(self.shards)} shard(s) of {self.root}")
        names = self.root / "classes.txt"
        labels = sorted({t for _, t in self.samples})
        if names.is_file():
            self.classes = names.read_text(encoding="utf-8").splitlines()
            if labels and labels[-1] >= len(self.classes):
                raise DataError(f"{names} names {len(self.classes)} classes but a shard has label {labels[-1]}")
        else:
            self.classes = [str(i) for i in range(labels[-1] + 1)] if labels and labels[0] >= 0 else []
        if with_labels and (not self.classes or labels[0] < 0):
            raise DataError(f"the shards of {self.root} carry no labels (.cls members) for every sample")
        self._handles: dict[int, int] = {}  # shard index -> open file descriptor

    @staticmethod
    def _index(si: int, shard: Path) -> tuple[list, int]:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, mode="r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    folder, _, base = m.name.rpartition("/")
                    stem, dot, ext = base.partition(".")
                    if not dot or stem.startswith("."):
                        continue
                    groups.setdefault(f"{folder}/{stem}", {})[ext.lower()] = m
                    if ext.lower() == "cls":  # tiny: read now, while the header is at hand
                        groups[f"{folder}/{stem}"]["_label"] = tf.extractfile(m).read()  # type: ignore[union-attr,assignment]
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"shard {shard} is not a readable tar file: {e}") from None
        out, missing = [], 0
        for members in groups.values():
            image = next((members[e] for e in _IMAGE_EXTS if e in members), None)
            if image is None:
                missing += 1
                continue
            raw = members.get("_label")
            try:
                label = int(raw.decode().strip()) if raw is not None else -1  # type: ignore[union-attr]
            except ValueError:
                raise DataError(f"shard {shard}: {image.name}'s label is not an integer") from None
            out.append(((si, image.offset_data, image.size, image.name), label))
        return out, missing

    def image(self, ref: Any) -> Image.Image | None:
        si, offset, size, name = ref
        fd = self._handles.get(si)
        if fd is None:
            fd = self._handles[si] = os.open(self.shards[si], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        # pread, not seek + read: forked DataLoader workers may share a descriptor opened before the fork
        return self.decoder(_Named(os.pread(fd, size, offset), f"{self.shards[si]}:{name}"), self.max_pixels)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # file handles do not travel to spawned workers
        return state

    def __repr__(self) -> str:
        return f"TarShards({str(self.root)!r}, {len(self.shards)} shards, {len(self)} images)"


class HFImageDataset(_Sharded):
    """A local HF ``datasets`` directory (``save_to_disk``): Arrow files, memory-mapped, random access."""

    IMAGE_COLUMNS = ("image", "img")
    LABEL_COLUMNS = ("label", "labels")

    def __init__(self, path: str | Path, transform: Callable[[Image.Image], Any] | None = None,
                 with_labels: bool = False, max_pixels: int | None = None) -> None:
        super().__init__(transform, with_labels, max_pixels)
        try:
            import datasets  # optional extra: beit[shards]
        except ImportError:
            raise DataError(f"{path} is an HF datasets directory: reading it needs `pip install 'beit[shards]'`") from None
        self.root = Path(path)
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{path} holds several splits ({', '.join(ds)}): give one split's folder")
        image_col = next((c for c in self.IMAGE_COLUMNS if c in ds.column_names), None)
        if image_col is None:
            raise DataError(f"{path} has no image column (looked for {', '.join(self.IMAGE_COLUMNS)})")
        label_col = next((c for c in self.LABEL_COLUMNS if c in ds.column_names), None)
        # the bytes, not decoded PIL images: decoding goes through load_image like every other image
        self.table = ds.cast_column(image_col, datasets.Image(decode=False)).select_columns([image_col])
        self.image_col = image_col
        labels = [int(v) for v in ds[label_col]] if label_col else [-1] * len(ds)
        feature = ds.features.get(label_col) if label_col else None
        names = getattr(feature, "names", None)
        self.classes = list(names) if names else ([str(i) for i in range(max(labels) + 1)] if label_col else [])
        if with_labels and not label_col:
            raise DataError(f"{path} has no label column (looked for {', '.join(self.LABEL_COLUMNS)})")
        self.samples = [(i, t) for i, t in enumerate(labels)]
        if not self.samples:
            raise DataError(f"{path} holds no rows")

    def image(self, ref: Any) -> Image.Image | None:
        cell = self.table[int(ref)][self.image_col]
        data = cell.get("bytes")
        if data is None and cell.get("path"):
            return self.decoder(cell["path"], self.max_pixels)
        return self.decoder(_Named(data or b"", f"{self.root}[{ref}]"), self.max_pixels)

    def __repr__(self) -> str:
        return f"HFImageDataset({str(self.root)!r}, {len(self)} images)"


def open_sharded(spec: str | Path, transform: Callable[[Image.Image], Any] | None = None,
                 with_labels: bool = False, max_pixels: int | None = None) -> _Sharded | None:
    """The shard set or HF datasets directory ``spec`` names, or None when it is neither (a folder)."""
    if is_hf_dataset_dir(spec):
        return HFImageDataset(spec, transform, with_labels, max_pixels)
    paths = shard_paths(spec)
    return TarShards(paths, transform, with_labels, max_pixels) if paths is not None else None


def open_images(spec: str | Path, transform: Callable[[Image.Image], Any] | None = None,
                with_labels: bool = False, max_pixels: int | None = None) -> Dataset:
    """What every training command's ``--data`` may be: a folder of images, tar shards, an HF datasets
    directory; one dataset with ``classes``, ``samples`` and ``load(i)`` either way."""
    ds = open_sharded(spec, transform, with_labels, max_pixels)
    return ds if ds is not None else ImageFolder(spec, transform, with_labels, max_pixels)


# --------------------------------------------------------------------------------------------- writing


def pack(dataset, out: str | Path, shard_size: int = 1000, prefix: str = "train",
         progress: Callable[[int], None] | None = None) -> list[Path]:
    """Write ``dataset`` (a folder dataset: ``samples`` of ``(path, label)``, ``classes``) as tar shards
    ``out/prefix-000000.tar`` ... of ``shard_size`` samples each, the original file bytes unchanged (no
    re-encoding) plus ``.cls`` when labelled, ``classes.txt`` and ``shards.txt``; then verify that every
    shard reads back to the same bytes. Unreadable source files are left out (warned by the dataset)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob(f"{prefix}-*.tar"))
    if existing:
        raise DataError(f"{out} already holds shards ({existing[0].name}, ...): give an empty or new folder")
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")
    samples = list(dataset.samples)
    written: list[Path] = []
    for start in range(0, len(samples), shard_size):
        path = out / f"{prefix}-{start // shard_size:06d}.tar"
        tmp = path.with_name(path.name + ".tmp")
        with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for k, (src, label) in enumerate(samples[start:start + shard_size], start):
                data = Path(src).read_bytes()
                _add(tf, f"{k:09d}{Path(src).suffix.lower()}", data)
                if label >= 0:
                    _add(tf, f"{k:09d}.cls", str(label).encode())
                if progress is not None:
                    progress(1)
        tmp.replace(path)
        written.append(path)
    if dataset.classes:
        (out / "classes.txt").write_text("".join(f"{c}\n" for c in dataset.classes), encoding="utf-8")
    (out / "shards.txt").write_text("".join(f"{p.name}\n" for p in written), encoding="utf-8")
    verify(written, samples)
    return written


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: the same folder packs to the same bytes
    tf.addfile(info, io.BytesIO(data))


def verify(shards: list[Path], samples: list[tuple[Any, int]]) -> None:
    """Every sample of ``samples`` is in ``shards``, in order, with the same bytes and label."""
    ds = TarShards(shards)
    if len(ds) != len(samples):
        raise DataError(f"verification: the shards hold {len(ds)} samples, {len(samples)} were written")
    for (ref, label), (src, want) in zip(ds.samples, samples):
        si, offset, size, name = ref
        with open(ds.shards[si], "rb") as fh:
            fh.seek(offset)
            same = fh.read(size) == Path(src).read_bytes()
        if not same or label != want:
            raise DataError(f"verification: {ds.shards[si].name}:{name} differs from {src}")


__all__ = ["HFImageDataset", "TarShards", "expand_braces", "is_hf_dataset_dir", "open_images", "open_sharded", "pack",
           "shard_paths", "verify"]
