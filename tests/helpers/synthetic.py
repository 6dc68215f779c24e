"""Small generated datasets shared by test modules (import as ``from tests.helpers.synthetic import ...``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"blue": (30, 30, 220), "green": (30, 200, 30), "red": (220, 30, 30)}


def make_colour_dataset(root: Path, n_train: int = 6, n_val: int = 3, size: int = 16) -> Path:
    """root/{train,val}/<colour>/i.png: noisy solid colours, trivially separable."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for name, rgb in COLOURS.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = np.asarray(rgb, dtype=np.float64)[None, None] + rng.normal(0, 15, (size, size, 3))
                Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return root
