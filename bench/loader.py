"""Data loading for 224 px pretraining: images/s per CPU core of each loader path, against a plain torchvision
``ImageFolder`` + ``RandomResizedCrop`` as the peer, in one process (one thread, no workers: per core).

The images are ImageNet-like JPEGs (about 400x350, quality 90) made from the images shipped with the package
(Fashion-MNIST garments, 4x4 mosaics with a colour tint per garment, upscaled; written once into ``--work``).

Paths, each producing what a training step consumes (timed round-robin, so machine noise hits all alike):

- ``peer``: ``torchvision.datasets.ImageFolder`` + ``RandomResizedCrop(224)``, flip, ``ToTensor``,
  ``Normalize`` (float32 per sample): what most training scripts run.
- ``beit_folder``: beit's folder dataset + the BEiT pretraining transform (one decode, both views: 224 patch
  view bicubic + 112 tokenizer view Lanczos, colour jitter, block mask), the per-pixel float work done per
  batch on the CPU (what a CPU run does).
- ``beit_shards``: the same from tar shards (``beit data pack``), read with ``pread``.
- ``beit_shards_u8``: the same, but the batch stays uint8 (crops, flips, mask and jitter parameters):
  the float conversion, jitter and normalisation then run on the accelerator after the transfer
  (``BeitPretrainTransform.batched(on_device=True)``, what pretraining on CUDA does), so the CPU does only
  decode + crop + resize.
- ``beit_shards_u8_fast``: that, with ``data.decode=fast``: JPEGs decoded by torchvision (libjpeg-turbo)
  into uint8 tensors, both views resampled as tensors.
- ``mae_shards_u8_fast``: MAE's transform (the patch view only, the output the peer makes), uint8 batches
  finished on the device, ``data.decode=fast``.

    python bench/loader.py                      # 256 images, every path
    python bench/loader.py --n 64 --dry-run     # CI: a few images, checks the output fields
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beit import machine  # noqa: E402
from beit.data.decode import decode_tensor  # noqa: E402
from beit.data.embedded import load_arrays  # noqa: E402
from beit.data.folder import ImageFolder  # noqa: E402
from beit.data.shards import TarShards, pack  # noqa: E402
from beit.data.views import BeitPretrainTransform, TwoViewTransform  # noqa: E402
from beit.masking import block_mask  # noqa: E402
from beit.methods.mae import MAETransform  # noqa: E402

BATCH = 32


def make_jpegs(folder: Path, n: int, size=(400, 350), quality: int = 90, seed: int = 0) -> Path:
    """``n`` JPEGs of ``size`` (w, h) under ``folder/imgs/`` (kept between runs with the same arguments)."""
    out = folder / f"imgs_{n}_{size[0]}x{size[1]}_q{quality}" / "img"  # one class folder: the peer needs one
    if out.is_dir() and len(list(out.glob("*.jpg"))) == n:
        return out
    out.mkdir(parents=True, exist_ok=True)
    images, _ = load_arrays()
    rng = np.random.default_rng(seed)
    for i in range(n):
        tiles = images[rng.integers(0, len(images), 16)].astype(np.float32) / 255  # (16, 28, 28)
        tint = rng.uniform(0.3, 1.0, (16, 1, 1, 3)).astype(np.float32)
        bg = rng.uniform(0.0, 0.4, (16, 1, 1, 3)).astype(np.float32)
        rgb = bg + tiles[..., None] * (tint - bg)  # (16, 28, 28, 3): a coloured garment on its own background
        mosaic = rgb.reshape(4, 4, 28, 28, 3).transpose(0, 2, 1, 3, 4).reshape(112, 112, 3)
        img = Image.fromarray((mosaic * 255).astype(np.uint8)).resize(size, Image.BICUBIC)
        noisy = np.asarray(img, np.int16) + rng.integers(-6, 7, (size[1], size[0], 3))  # sensor-like grain
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out / f"{i:06d}.jpg", quality=quality)
    return out


def peer_loader(root: Path):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder as TVImageFolder

    tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ds = TVImageFolder(str(root.parent), transform=tf)

    def batch(idx: list[int]):
        return torch.utils.data.default_collate([ds[i][0] for i in idx])

    return len(ds), batch


def beit_transform(resize: str = "pil") -> BeitPretrainTransform:
    """BEiT-B's pretraining transform (beit_base_patch16_224: 224 + 112 views, 75 of 196 patches masked)."""
    views = TwoViewTransform(224, 112, resize=resize)
    return BeitPretrainTransform(views, lambda g: block_mask((14, 14), 75, generator=g))


def mae_transform(resize: str = "pil") -> MAETransform:
    """MAE-B's (mae_base_patch16_224): one 224 view, no colour jitter, per-patch noise."""
    return MAETransform(TwoViewTransform(224, None, scale=(0.2, 1.0), color_jitter=0.0, resize=resize), 196)


def beit_loader(ds, finish: bool, fast: bool = False, method: str = "beit"):
    """``fast``: data.decode=fast (torchvision's JPEG decoder, views resampled as uint8 tensors)."""
    tf = (beit_transform if method == "beit" else mae_transform)("tensor" if fast else "pil")
    if fast:
        ds.decoder = decode_tensor
    collate = tf.batched()
    ds.transform = tf

    def batch(idx: list[int]):
        samples = [ds[i] for i in idx]
        return collate(samples) if finish else tf.collate_uint8(samples)

    return len(ds), batch


def time_paths(paths: dict, n_batches: int, rounds: int) -> dict[str, float]:
    """Images/s of each path: ``rounds`` rounds, each timing ``n_batches`` batches of every path in turn."""
    per: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(rounds):
        for name, (n, make) in paths.items():
            torch.manual_seed(r)
            t0 = time.perf_counter()
            for b in range(n_batches):
                start = (b * BATCH + r * 7) % max(1, n - BATCH)
                make(list(range(start, start + BATCH)))
            per[name].append(n_batches * BATCH / (time.perf_counter() - t0))
    return {k: round(statistics.median(v), 1) for k, v in per.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256, help="images to make and read")
    ap.add_argument("--batches", type=int, default=4, help="batches of 32 per path per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/beit_bench_loader", help="where the JPEGs and shards are written")
    ap.add_argument("--dry-run", action="store_true", help="tiny: 64 images, 1 batch, 1 round (CI)")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args(argv)
    if a.dry_run:
        a.n, a.batches, a.rounds = max(a.n, BATCH) if a.n < 64 else 64, 1, 1
    torch.set_num_threads(1)  # per core
    work = Path(a.work)
    root = make_jpegs(work, a.n)
    shard_dir = work / f"shards_{root.parent.name}"
    if not (shard_dir / "shards.txt").is_file():
        pack(ImageFolder(root), shard_dir, shard_size=128)
    paths = {
        "peer": peer_loader(root),
        "beit_folder": beit_loader(ImageFolder(root), finish=True),
        "beit_shards": beit_loader(TarShards(sorted(shard_dir.glob("*.tar"))), finish=True),
        "beit_shards_u8": beit_loader(TarShards(sorted(shard_dir.glob("*.tar"))), finish=False),
        "beit_shards_u8_fast": beit_loader(TarShards(sorted(shard_dir.glob("*.tar"))), finish=False, fast=True),
        "mae_shards_u8_fast": beit_loader(TarShards(sorted(shard_dir.glob("*.tar"))), finish=False, fast=True,
                                          method="mae"),
    }
    rates = time_paths(paths, a.batches, a.rounds)
    best = max((k for k in rates if k != "peer"), key=rates.get)
    out = {"machine": machine.describe(), "threads": 1, "images": a.n, "image_size": "400x350 JPEG q90",
           "output": "224 patch view (+112 tokenizer view and mask for beit paths)", "images_per_s_per_core": rates,
           "fastest": best, "fastest_over_peer": round(rates[best] / rates["peer"], 2)}
    print(json.dumps(out))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
