"""Attention on CPU: ``F.scaled_dot_product_attention`` against the formula written out
(:func:`beit.models.vit._explicit_attention`, what the backbone uses on CPU), forward + backward, with and
without a relative position bias, at the sequence lengths of the presets. Median of ``--iters`` after one
warm-up call, both timed in this process, alternating.

    python bench/attention_cpu.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beit import machine  # noqa: E402
from beit.models.vit import _explicit_attention  # noqa: E402

# (name, batch, heads, tokens): the tiny preset (8x8 patches + [CLS]), MAE's visible 25%, base at 224 px
SHAPES = [("tiny 32px", 128, 3, 65), ("tiny, MAE visible", 128, 3, 17), ("base 224px", 8, 12, 197)]


def step(fn, q0, k0, v0, bias, dtype):
    q, k, v = (t.to(dtype) for t in (q0, k0, v0))
    out = fn(q, k, v, None if bias is None else bias)
    out.float().sum().backward()


def sdpa(q, k, v, bias):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine.describe('cpu')}")
    print("| shape | dtype | bias | SDPA ms | explicit ms | SDPA / explicit |")
    print("|---|---|---|---|---|---|")
    for name, b, h, t in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            for with_bias in (False, True):
                q0, k0, v0 = (torch.randn(b, h, t, 64, requires_grad=True) for _ in range(3))
                bias = torch.zeros(1, h, t, t, requires_grad=True) if with_bias else None
                times = {"sdpa": [], "explicit": []}
                for fn in (sdpa, _explicit_attention):
                    step(fn, q0, k0, v0, bias, dtype)  # warm-up
                for _ in range(args.iters):
                    for key, fn in (("sdpa", sdpa), ("explicit", _explicit_attention)):
                        t0 = time.perf_counter()
                        step(fn, q0, k0, v0, bias, dtype)
                        times[key].append(1000 * (time.perf_counter() - t0))
                s, e = statistics.median(times["sdpa"]), statistics.median(times["explicit"])
                print(f"| {name} ({b}x{h}x{t}) | {str(dtype)[6:]} | {'yes' if with_bias else 'no'} | {s:.1f} | "
                      f"{e:.1f} | {s / e:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
