"""Fast decoding for large images: JPEGs straight to ``(3, H, W)`` uint8 tensors (``data.decode=fast``).

:func:`beit.data.folder.load_image` decodes with PIL into a PIL image. For ImageNet-sized JPEGs the decode and
the two resizes of the BEiT views dominate a loader worker's time; torchvision's decoder (libjpeg-turbo) and
its uint8 tensor resampling (antialiased bilinear/bicubic kernels) do the same work in less time
(``bench/loader.py``). Only baseline/progressive JPEGs take this path: they have no transparency, so the
result is what PIL gives (the same library decodes both; pixels may differ by decoder rounding). Every other
file, a JPEG above the pixel limit, and anything torchvision cannot decode goes through :func:`load_image`
(modes, transparency on white, EXIF, the pixel limit, warnings) and is converted, so both paths read the same
files and skip the same ones.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .folder import default_max_pixels, load_image

_JPEG_MAGIC = b"\xff\xd8\xff"


def _read_bytes(source) -> bytes:
    if isinstance(source, (str, os.PathLike)):
        return Path(source).read_bytes()
    source.seek(0)
    return source.read()


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``(3, H, W)`` uint8 (a copy)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_tensor(source, max_pixels: int | None = None) -> torch.Tensor | None:
    """``(3, H, W)`` uint8 RGB with the EXIF orientation applied, or None (warned) if unreadable, like
    :func:`load_image`. ``source``: a path or a binary file object."""
    from torchvision.io import ImageReadMode, decode_jpeg  # torchvision's image library loads on first use

    try:
        data = _read_bytes(source)
    except OSError:
        data = b""
    if data[:3] == _JPEG_MAGIC:
        try:
            with Image.open(io.BytesIO(data)) as probe:  # the header only: the size before any pixel
                small = probe.width * probe.height <= (max_pixels or default_max_pixels())
            if small:
                buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                return decode_jpeg(buf, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except (OSError, RuntimeError, ValueError, SyntaxError, Image.DecompressionBombError):
            pass  # PIL below decodes what it can, and words the warning
    if not isinstance(source, (str, os.PathLike)):
        source.seek(0)
    img = load_image(source, max_pixels)
    return None if img is None else pil_to_tensor(img)


__all__ = ["decode_tensor", "pil_to_tensor"]
