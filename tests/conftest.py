"""Shared test fixtures. Keep them generic: every test module may use them.

Image fixtures (all images are generated, deterministic from a seed, smooth enough for a tiny model to
learn: colour gradients plus a filled rectangle):

- ``synthetic_images(n, size=32, seed=0) -> torch.Tensor``: (n, 3, size, size) float in [0, 1].
- ``make_image_folder(root=None, classes=("a", "b"), per_class=4, size=32, seed=0, ext="png") -> Path``:
  writes ``root/<class>/<i>.<ext>`` (``classes=()`` writes the images directly in ``root``); ``root`` defaults
  to a fresh folder under ``tmp_path``.
- ``image_folder -> Path``: a ready labelled folder (2 classes x 4 PNG images, 32x32).

Tests run on CPU with one intra-op thread: ``pytest -n 2`` already uses both cores, tiny models do not gain
from more, and oversubscribed OpenMP threads on a shared machine slow small ops down tenfold (measured).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)  # tests run 2 at a time (pytest -n 2) on 2 cores


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped where there is no GPU (``scripts/gpu_check.sh`` runs them on one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _synthetic_array(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size, 3) uint8: a random colour gradient with one random filled rectangle per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        c0, cx, cy = rng.uniform(0, 1, 3), rng.uniform(-0.5, 0.5, 3), rng.uniform(-0.5, 0.5, 3)
        img = c0 + cx * xx[..., None] + cy * yy[..., None]
        x0, y0 = rng.integers(0, size // 2, 2)
        x1, y1 = x0 + rng.integers(size // 4, size // 2 + 1, 2)
        img[y0:y1, x0:x1] = rng.uniform(0, 1, 3)
        out[i] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


@pytest.fixture
def synthetic_images():
    def make(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
        a = _synthetic_array(n, size, seed)
        return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255  # (n, 3, size, size)

    return make


@pytest.fixture
def make_image_folder(tmp_path):
    counter = itertools.count()

    def make(
        root: str | Path | None = None,
        classes: tuple[str, ...] | list[str] = ("a", "b"),
        per_class: int = 4,
        size: int = 32,
        seed: int = 0,
        ext: str = "png",
    ) -> Path:
        root = Path(root) if root is not None else tmp_path / f"images{next(counter)}"
        root.mkdir(parents=True, exist_ok=True)
        groups = list(classes) or [""]
        arrays = _synthetic_array(len(groups) * per_class, size, seed)
        for c, cls in enumerate(groups):
            folder = root / cls if cls else root
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(arrays[c * per_class + i]).save(folder / f"{i}.{ext}")
        return root

    return make


@pytest.fixture
def image_folder(make_image_folder) -> Path:
    return make_image_folder()
