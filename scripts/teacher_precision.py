"""How much a VQ-KD teacher's features change in bf16: per-patch cosine between its fp32 and bf16 features.

Usage: python scripts/teacher_precision.py TEACHER IMAGES [--n 64] [--block -1]
TEACHER: anything ``beit.load`` reads that holds a backbone; IMAGES: a folder of images (the first N, centre
crops at the teacher's resolution). Prints one JSON line: mean / 1st percentile / min cosine over patches,
with the machine (CPU, torch's ISA) it ran on. docs/tokenizer.md records the result.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from beit.data.tokenizer import build_dataset
from beit.tokenizers.vqkd import Teacher


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("teacher")
    p.add_argument("images")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--block", type=int, default=-1)
    a = p.parse_args()
    t32 = Teacher.load(a.teacher, a.block, "fp32")
    t16 = Teacher(t32.model, a.block, "bf16")
    size = t32.model.patch_embed.img_hw[0]
    ds = build_dataset(a.images, size, train=False, limit=a.n)
    x = torch.stack([ds[i] for i in range(len(ds))])  # type: ignore[arg-type]
    grid = t32.model.grid_size
    f32, f16 = t32.features(x, grid), t16.features(x, grid)
    cos = torch.nn.functional.cosine_similarity(f32, f16, dim=-1).flatten()  # (B*N,)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    print(json.dumps({"images": len(x), "patches": cos.numel(), "block": t32.block, "cos_mean": float(cos.mean()),
                      "cos_p01": float(cos.quantile(0.01)), "cos_min": float(cos.min()), "cpu": cpu,
                      "isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
