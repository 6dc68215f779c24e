"""Decode once: the decoded uint8 RGB pixels of a folder of small images, in one memory-mapped file.

Decoding a 32 px PNG costs about as much as all of its augmentation, every epoch. For small images (the
CPU presets) :class:`DecodeCache` decodes each file once, with :func:`beit.data.folder.load_image` (same
modes, EXIF and transparency handling), into ``DIR/decoded-KEY.u8`` plus an index ``DIR/decoded-KEY.npy``.
The key hashes every file's path, size and modification time, so a changed folder gets a new cache, never a
stale one; and every read checks the file's size and mtime again, so a file changed *after* caching is read
from disk. The files are written under temporary names and renamed (the index last), so a crash never
leaves a half cache that looks complete. DataLoader workers (forked) share the pages of the memory map.

    cache = DecodeCache.open_or_build(paths, run_dir / "decode_cache")
    img = cache.get(i)          # PIL RGB image, or None: decode from disk (changed or unreadable file)
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .folder import load_image, not_a_file

log = logging.getLogger("beit")

DEFAULT_MAX_BYTES = 4 << 30  # decoded size above which ``auto`` does not cache (ImageNet is ~150 GB decoded)
_FIELDS = 5  # index columns: offset, height, width, file size, file mtime_ns


def _stat(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def cache_key(paths: list[Path]) -> str:
    """A hash of every file's path, size and mtime: any change to the folder gives another key."""
    h = hashlib.blake2b(digest_size=12)
    for p in paths:
        size, mtime = _stat(p)
        h.update(f"{p}\t{size}\t{mtime}\n".encode())
    return h.hexdigest()


class DecodeCache:
    def __init__(self, paths: list[Path], data: np.ndarray, index: np.ndarray) -> None:
        self.paths, self.data, self.index = paths, data, index  # index: (N, 5) int64

    def __len__(self) -> int:
        return len(self.paths)

    def keep(self, indices: list[int]) -> None:
        """Keep only the entries ``indices`` (in that order): the dataset left the others out."""
        self.paths = [self.paths[i] for i in indices]
        self.index = self.index[np.asarray(indices, dtype=np.int64)]

    def undecodable(self) -> list[int]:
        """The entries whose file could not be decoded when the cache was built."""
        return [int(i) for i in np.flatnonzero(self.index[:, 1] == 0)]

    def get(self, i: int) -> Image.Image | None:
        """Image ``i`` from the cache, or None if its file changed since caching or could not be decoded."""
        off, h, w, size, mtime = (int(v) for v in self.index[i])
        if h == 0:
            return None
        try:
            if _stat(self.paths[i]) != (size, mtime):
                return None
        except OSError:
            return None
        return Image.fromarray(np.asarray(self.data[off:off + h * w * 3]).reshape(h, w, 3), "RGB")

    @classmethod
    def open_or_build(cls, paths: list[Path], directory: str | Path, max_pixels: int | None = None) -> DecodeCache:
        """The cache of ``paths`` in ``directory``: reused if its key matches, else decoded and written."""
        directory = Path(directory)
        key = cache_key(paths)
        data_path, index_path = directory / f"decoded-{key}.u8", directory / f"decoded-{key}.npy"
        if not (data_path.is_file() and index_path.is_file()):
            directory.mkdir(parents=True, exist_ok=True)
            for old in directory.glob("decoded-*"):  # another folder state's cache: never reused
                if key not in old.name:  # (same key: another process of this run writing it too)
                    old.unlink(missing_ok=True)
            _build(paths, data_path, index_path, max_pixels)
        index = np.load(index_path)
        if index.shape != (len(paths), _FIELDS):
            raise ValueError(f"decode cache {index_path} does not match the {len(paths)} files")
        data = np.memmap(data_path, dtype=np.uint8, mode="r") if data_path.stat().st_size else np.zeros(0, np.uint8)
        return cls(list(paths), data, index)


def _build(paths: list[Path], data_path: Path, index_path: Path, max_pixels: int | None) -> None:
    log.info("decoding %d images once into %s", len(paths), data_path.parent)
    index = np.zeros((len(paths), _FIELDS), dtype=np.int64)
    tmp = data_path.with_name(f"{data_path.name}.tmp{os.getpid()}")
    offset = 0
    with open(tmp, "wb") as fh:
        for i, p in enumerate(paths):
            size, mtime = _stat(p)  # before decoding: a file changed meanwhile then fails the check at read
            img = load_image(p, max_pixels)
            index[i, 3:] = (size, mtime)
            if img is None:
                continue  # h = 0: warned about; the dataset leaves it out (attach)
            a = np.asarray(img, dtype=np.uint8)
            fh.write(a.tobytes())
            index[i, :3] = (offset, a.shape[0], a.shape[1])
            offset += a.size
    tmp.replace(data_path)
    tmp_index = index_path.with_name(f"{index_path.stem}.tmp{os.getpid()}.npy")
    np.save(tmp_index, index)
    tmp_index.replace(index_path)  # last: its presence means the cache is complete


def attach(dataset, directory: str | Path, mode: str = "auto", max_bytes: int = DEFAULT_MAX_BYTES) -> bool:
    """Give an :class:`~beit.data.folder.ImageFolder` a decode cache in ``directory`` (``data.decode_cache``):
    ``on``, ``off``, or ``auto`` (on when the decoded images fit in ``max_bytes``). Returns whether it did.
    Files that fail to decode are left out of the dataset (:meth:`~beit.data.folder.ImageFolder.exclude`)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"decode cache mode must be auto, on or off, got {mode!r}")
    if mode == "off" or (mode == "auto" and estimated_bytes(dataset.paths) > max_bytes):
        return False
    dataset.cache = DecodeCache.open_or_build(dataset.paths, directory, dataset.max_pixels)
    dataset.exclude({i: "could not be decoded" for i in dataset.cache.undecodable()})
    return True


def estimated_bytes(paths: list[Path], max_pixels: int | None = None, sample: int = 8) -> int:
    """Decoded size of ``paths``, estimated from (up to) ``sample`` files spread over the list."""
    if not paths:
        return 0
    step = max(1, len(paths) // sample)
    sizes = []
    for p in paths[::step][:sample]:
        if not_a_file(p):  # before opening: a FIFO would block
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(p) as im:
                    sizes.append(im.width * im.height * 3)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
    return int(np.mean(sizes) * len(paths)) if sizes else 0


__all__ = ["DEFAULT_MAX_BYTES", "DecodeCache", "attach", "cache_key", "estimated_bytes"]
