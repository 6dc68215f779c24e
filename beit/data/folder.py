"""Image discovery and robust loading.

- :func:`list_images` finds images in any folder tree, sorted, so every run sees the same order.
- :func:`load_image` turns whatever an image file holds into an 8-bit RGB ``PIL.Image``: grayscale,
  palette, CMYK and 16-bit files are converted, transparent images are composited **on white** (a
  transparent logo or cut-out looks like it does in a browser, and black halos do not become features), and
  the EXIF orientation is applied. A file that cannot be decoded (truncated, empty, not an image) gives
  ``None`` and one warning naming the file, never an exception. Images above a pixel limit (40 MP, or
  ``BEIT_MAX_PIXELS``) are decoded at a reduced scale when the format allows it (JPEG), else skipped with
  a warning naming the file: a huge photo never costs gigabytes on every draw.
- :class:`ImageFolder` is a ``torch.utils.data.Dataset`` over a folder tree, with optional ImageNet-style
  labels (``root/<class>/**/image``). **Skipped means skipped**: a file that is not an image is left out of
  the index when the dataset is built, never replaced by another sample (whose label would then be counted
  twice). Each file is first ``os.stat``-ed (a FIFO, socket, device, dangling link or empty file is never
  opened: opening a FIFO blocks forever), then its header is read with PIL's lazy ``open`` (garbage, and
  decompression bombs claiming billions of pixels, fail here without decoding anything). The skipped files
  are counted in one warning and kept in :attr:`ImageFolder.skipped` (the tasks write them to
  ``RUN/skipped_files.txt``); the decode cache, which decodes every file, leaves out the ones that fail then.
  A file whose header reads but whose pixels do not (truncated data, or changed on disk since) can only be
  found when it is drawn: it is then dropped from its batch (:class:`DropUnreadable`; the batch is one image
  smaller), warned about once and appended to the list; it is never replaced by another image.

Names holding control characters (a class folder ``cat\\ndog``) are refused when the folder is read: they
would break ``classes.txt`` and every list written one name per line.

Hidden files and folders (``.DS_Store``, macOS ``._x.jpg`` resource forks, ``.ipynb_checkpoints``) are
ignored: they are never images a user meant to train on.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SKIP_LIST = "skipped_files.txt"  # in a run folder: the data files left out, one "path<TAB>reason" a line
DEFAULT_MAX_PIXELS = 40_000_000  # larger images are downscaled at decode (JPEG) or skipped; BEIT_MAX_PIXELS


class DataError(ValueError):
    """A user mistake about data (missing folder, no images, unreadable dataset); one-line message."""


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image_name(name: str) -> bool:
    return not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def _check_dir(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder (expected a folder of images)")
    return root


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_name(folder: str, name: str) -> None:
    if _CONTROL.search(name):
        raise DataError(f"{folder} holds a name with a control character, {name!r}: rename it (names are written "
                        "one per line, e.g. to classes.txt)")


def list_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive, extensions case-insensitive), sorted by relative path.

    Sorting is on the path components, so ``a/x.png`` comes before ``a-b/x.png`` on every platform and file
    system. Symlinked files are followed; symlinked folders are not (no cycles). A folder or image name
    with a control character (newline, tab...) is a :class:`DataError`.
    """
    root = _check_dir(root)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        images = [f for f in filenames if _is_image_name(f)]
        for name in [*dirnames, *images]:  # other files are never read: their names do not matter
            _check_name(dirpath, name)
        found.extend(Path(dirpath) / f for f in images)
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def not_a_file(path: str | Path) -> str | None:
    """Why ``path`` cannot be an image without opening it (``os.stat`` only), or None for a non-empty
    regular file: a dangling link, a FIFO (opening one blocks until a writer comes), a socket, a device."""
    try:
        st = os.stat(path)
    except OSError as e:
        if os.path.islink(path):
            return "a dangling symbolic link"
        return e.strerror or type(e).__name__
    if stat.S_ISREG(st.st_mode):
        return "an empty file" if st.st_size == 0 else None
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a folder")):
        if test(st.st_mode):
            return f"not a regular file ({kind})"
    return "not a regular file"


def header_problem(path: str | Path, max_pixels: int | None = None) -> str | None:
    """Why ``path`` is not a usable image, from ``os.stat`` and its header alone (PIL's lazy ``open`` decodes
    no pixel), or None. A non-JPEG image above ``max_pixels`` is a problem (it cannot be decoded at a reduced
    scale; :func:`load_image`), and so is one claiming more pixels than PIL's decompression-bomb limit."""
    reason = not_a_file(path)
    if reason:
        return reason
    limit = max_pixels or default_max_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pixel limit below handles it
            with Image.open(path) as img:
                (w, h), fmt = img.size, img.format
    except Image.DecompressionBombError as e:
        return f"decompression bomb ({str(e).splitlines()[0]})"
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    if w < 1 or h < 1:
        return f"an image of {w}x{h} pixels"
    if w * h > limit and fmt != "JPEG":
        _warn_once(path, f"skipping huge image {path}: {w}x{h} = {w * h / 1e6:.0f} MP is above the limit of "
                         f"{limit / 1e6:.0f} MP (set BEIT_MAX_PIXELS to raise it, or downscale the file)")
        return f"{w}x{h} pixels, above the limit of {limit / 1e6:.0f} MP (BEIT_MAX_PIXELS)"
    return None


def header_problems(paths: list[Path], max_pixels: int | None = None) -> list[str | None]:
    """:func:`header_problem` of each path. One after another: measured on CIFAR-10's 50,000 train PNGs (page
    cache warm, 2-core Xeon), 43-52 us a file (2.3 s for all, a quarter of one decode each), and 8 threads
    were 2.5x slower (the work is Python under the GIL), so ImageNet's 1.28M files cost about a minute."""
    return [header_problem(p, max_pixels) for p in paths]


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (transparency composited on white, 16/32-bit scaled to 8 bits)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale (PNG opens as I;16 or I): scale 0..65535 -> 0..255, rounding, not truncating
        # (PIL's own convert("L") clips at 255, turning most 16-bit images white). A 32-bit "I" image whose
        # values all fit in 8 bits was made from an 8-bit one and is kept as is.
        a = np.asarray(img, dtype=np.float64)
        if mode != "I" or a.max(initial=0) > 255:
            a = a / 257.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        scale = 255.0 if np.nanmax(a) <= 1.0 else 1.0  # float images are either in [0, 1] or in [0, 255]
        a = np.clip(np.rint(np.nan_to_num(a) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def default_max_pixels() -> int:
    """The pixel limit of :func:`load_image`: ``BEIT_MAX_PIXELS`` from the environment, else 40 MP."""
    raw = os.environ.get("BEIT_MAX_PIXELS", "")
    try:
        value = int(float(raw)) if raw else DEFAULT_MAX_PIXELS
    except ValueError:
        raise DataError(f"BEIT_MAX_PIXELS={raw!r} is not a number of pixels") from None
    if value < 1:
        raise DataError(f"BEIT_MAX_PIXELS must be >= 1, got {value}")
    return value


def _fit_pixels(img: Image.Image, path: str | Path, max_pixels: int) -> Image.Image | None:
    """Decode ``img`` (opened, not loaded) with at most ``max_pixels``: a JPEG larger than that is decoded
    at a reduced scale (``draft``) then ``reduce``d; other formats cannot be decoded partially, so a huge
    one is skipped (``None``) with a warning naming the file."""
    w, h = img.size
    if w * h <= max_pixels:
        img.load()
        return img
    if img.format != "JPEG":
        _warn_once(path, f"skipping huge image {path}: {w}x{h} = {w * h / 1e6:.0f} MP is above the limit of "
                         f"{max_pixels / 1e6:.0f} MP (set BEIT_MAX_PIXELS to raise it, or downscale the file)")
        return None
    scale = math.sqrt(w * h / max_pixels)
    img.draft(img.mode, (math.ceil(w / scale), math.ceil(h / scale)))  # DCT scaling: 1/2, 1/4 or 1/8
    img.load()
    factor = math.ceil(math.sqrt(img.width * img.height / max_pixels))
    out = img.reduce(factor) if factor > 1 else img
    _warn_once(path, f"downscaled huge image {path} from {w}x{h} to {out.width}x{out.height} "
                     f"(limit {max_pixels / 1e6:.0f} MP, BEIT_MAX_PIXELS)")
    return out


_warned: set[str] = set()


def _warn_once(path: str | Path, message: str) -> None:
    if str(path) not in _warned:
        _warned.add(str(path))
        logger.warning("%s", message)


def load_image(path: str | Path | BinaryIO, max_pixels: int | None = None) -> Image.Image | None:
    """Read one image as 8-bit RGB with its EXIF orientation applied, or ``None`` (one warning) if unreadable.
    Images above ``max_pixels`` (default :func:`default_max_pixels`) are downscaled at decode or skipped.
    ``path`` may also be a binary file object holding the file's bytes (a member of a tar shard)."""
    limit = max_pixels or default_max_pixels()
    is_path = isinstance(path, (str, os.PathLike))
    reason = not_a_file(path) if is_path else None  # before opening: a FIFO would block, a dangling link raise
    if reason:
        logger.warning("skipping unreadable image %s: %s", path, reason)
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pixel limit handles it
            with Image.open(path) as img:
                fitted = _fit_pixels(img, path, limit)  # decode now: truncated files fail here, not in a worker
                if fitted is None:
                    return None
                return _to_rgb(ImageOps.exif_transpose(fitted)).copy()
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        logger.warning("skipping unreadable image %s: %s", path, reason)
        return None


_WORKER_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)): (.*)$")


def unwrap_worker_error(e: BaseException) -> BaseException:
    """An exception raised in a DataLoader worker arrives with PyTorch's wrapper message (the worker's
    whole traceback); return the same type holding only the original message. Others are returned as is."""
    text = str(e)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return e
    lines = text.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        m = _WORKER_LINE.match(lines[i])
        if m:
            message = " ".join([m.group(2), *lines[i + 1:]]).strip()
            try:
                return type(e)(message)
            except Exception:  # noqa: BLE001 - an exception type that needs other arguments
                return RuntimeError(message)
    return e


class ImageFolder(Dataset):
    """Images from any folder tree, optionally labelled by their top-level sub-folder (ImageNet layout).

    ``dataset[i]`` is ``transform(image)`` (a PIL RGB image without a transform), or ``(that, label)`` with
    ``with_labels=True``; ``None`` for a file that could not be decoded when drawn (see the module notes:
    :class:`DropUnreadable` drops it from its batch). ``classes`` are the sorted sub-folder names (empty ones
    included, so indices stay stable between a train and a val split); ``class_to_idx`` maps them to labels.
    ``skipped`` lists ``(path, reason)`` of the files left out (:func:`header_problem`).
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        with_labels: bool = False,
        max_pixels: int | None = None,
    ) -> None:
        self.root = _check_dir(root)
        self.max_pixels = max_pixels or default_max_pixels()
        self.transform = transform
        self.with_labels = with_labels
        paths = list_images(self.root)
        if with_labels:
            self.classes = sorted(
                e.name for e in os.scandir(self.root) if e.is_dir() and not _is_hidden(e.name)
            )
            if not self.classes:
                raise DataError(
                    f"{self.root} has no class sub-folders: labels need the layout root/<class>/<image>"
                )
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
            loose = [p for p in paths if len(p.relative_to(self.root).parts) == 1]
            if loose:
                logger.warning(
                    "ignoring %d image(s) directly in %s (not in a class folder), e.g. %s",
                    len(loose), self.root, loose[0].name,
                )
            self.samples = [
                (p, self.class_to_idx[p.relative_to(self.root).parts[0]])
                for p in paths
                if len(p.relative_to(self.root).parts) > 1
            ]
        else:
            self.classes = []
            self.class_to_idx = {}
            self.samples = [(p, -1) for p in paths]
        if not self.samples:
            raise DataError(
                f"no images found under {self.root} (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        self.skipped: list[tuple[Path, str]] = []
        self.skip_log: Path | None = None  # where files found unreadable when drawn are appended (the run's list)
        self._bad: set[int] = set()  # per process: DataLoader workers each keep their own
        self.cache = None  # a beit.data.cache.DecodeCache of self.paths (decode once), or None
        # (path, max_pixels) -> image or None: load_image (PIL), or beit.data.decode.decode_tensor (data.decode=fast)
        self.decoder: Callable[[Any, int], Any] = load_image
        self.exclude(dict(enumerate(header_problems(self.paths, self.max_pixels))))

    def exclude(self, problems: dict[int, str | None]) -> None:
        """Leave the samples ``{index: reason}`` out of the index (a reason of None keeps the sample), with one
        warning counting them; every sample left out is a :class:`DataError` naming the first reasons."""
        bad = {i: r for i, r in problems.items() if r}
        if not bad:
            return
        n = len(self.samples)
        gone = [(self.samples[i][0], r) for i, r in sorted(bad.items())]
        self.skipped.extend(gone)
        self.samples = [s for i, s in enumerate(self.samples) if i not in bad]
        if self.cache is not None:
            self.cache.keep([i for i in range(n) if i not in bad])
        shown = "; ".join(f"{p.relative_to(self.root)}: {r}" for p, r in gone[:3]) + ("; ..." if len(gone) > 3 else "")
        if not self.samples:
            raise DataError(f"none of the {n} image files under {self.root} could be read ({shown})")
        logger.warning("skipping unreadable image(s) under %s: %d of %d files are left out (%s; a training run "
                       "lists them in RUN/%s)", self.root, len(gone), n, shown, SKIP_LIST)

    @property
    def paths(self) -> list[Path]:
        return [p for p, _ in self.samples]

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image | None, int]:
        """The image at ``index`` with its label; ``(None, label)`` if it cannot be decoded now (warned about
        once per process and appended to :attr:`skip_log`): never another sample in its place."""
        path, target = self.samples[index]
        if index in self._bad:
            return None, target
        img = self.cache.get(index) if self.cache is not None else None  # None: changed file, not cached
        if img is None:
            img = self.decoder(path, self.max_pixels)  # warns naming the file
        if img is None:
            self._bad.add(index)
            if self.skip_log is not None:
                append_skipped(self.skip_log, [(path, "could not be decoded when drawn")])
        return img, target

    def __getitem__(self, index: int) -> Any:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        img, target = self.load(index % len(self))
        if img is None:
            return None
        x = self.transform(img) if self.transform is not None else img
        return (x, target) if self.with_labels else x

    def __repr__(self) -> str:
        labels = f", {len(self.classes)} classes" if self.with_labels else ""
        return f"ImageFolder({str(self.root)!r}, {len(self)} images{labels})"


class DropUnreadable:
    """A DataLoader ``collate_fn`` that leaves out the ``None`` samples (images that could not be decoded
    when drawn) and collates the rest with ``collate`` (default: PyTorch's): the batch is smaller, and no
    other image stands in for the missing one."""

    def __init__(self, collate: Callable | None = None) -> None:
        self.collate = collate or default_collate

    def __call__(self, batch: list) -> Any:
        kept = [b for b in batch if b is not None]
        if not kept:
            raise DataError(f"none of the {len(batch)} images of a batch could be decoded (see the warnings above)")
        return self.collate(kept)



def append_skipped(path: str | Path, entries: list[tuple[Path, str]]) -> None:
    """Append ``path<TAB>reason`` lines to the skip list ``path`` (one ``write`` call with ``O_APPEND``:
    lines from several loader workers do not interleave)."""
    text = "".join(f"{p}\t{r}\n" for p, r in entries)
    if not text:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, text.encode("utf-8", "backslashreplace"))
    finally:
        os.close(fd)


def write_skip_list(path: str | Path, *datasets: ImageFolder) -> Path | None:
    """Write the files ``datasets`` left out to ``path`` (replacing an older list of this run), and make
    later finds append there. None (and no file) if nothing was skipped."""
    path = Path(path)
    path.unlink(missing_ok=True)
    entries = [e for ds in datasets for e in getattr(ds, "skipped", [])]
    for ds in datasets:
        if hasattr(ds, "skip_log"):  # ours (ImageFolder, SegmentationFolder); a dataset of the user's is left alone
            ds.skip_log = path
    if not entries:
        return None
    append_skipped(path, entries)
    logger.info("the %d file(s) left out are listed in %s", len(entries), path)  # counted once, when found
    return path


__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "SKIP_LIST", "DataError", "DropUnreadable", "ImageFolder",
           "append_skipped", "default_max_pixels", "header_problem", "header_problems", "list_images", "load_image",
           "not_a_file", "unwrap_worker_error", "write_skip_list"]
