"""Attention with BEiT's relative position bias: every kernel the backbone could use, accuracy and time.

For each kernel, forward + backward (gradients of q, k, v and of the bias, which BEiT learns) from the same
inputs, compared with a float64 computation of the formula from those same values (relative L2 error), in
bf16 and fp32, with the bias shared over the batch (1, H, T, T) and per sample (B, H, T, T); then the time of
forward + backward at the base model's training shape (batch 64, 12 heads, 197 tokens) and its peak memory.
A kernel that raises is recorded with its error, never skipped silently.

Kernels: ``sdpa`` (``F.scaled_dot_product_attention``, the bias cast to the inputs' dtype as the backbone
does; PyTorch picks the backend), ``sdpa_efficient`` / ``sdpa_math`` (that backend forced), ``explicit``
(the formula written out, what the backbone uses on CPU), and on CUDA ``flex`` (FlexAttention, the bias
added in a score modifier, as ``BEIT_FLEX_ATTENTION=1`` runs it).

    python bench/attention_kernels.py --json attention.json            # CUDA if available, else CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beit import machine  # noqa: E402
from beit.models import vit  # noqa: E402

NAMES = ("out", "dq", "dk", "dv", "dbias")


def _sdpa_backend(backend: str | None):
    from contextlib import nullcontext

    if backend is None:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, backend)])


def kernels(device: str) -> dict:
    def sdpa(backend=None):
        def fn(q, k, v, b):
            with _sdpa_backend(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=b.to(q.dtype))
        return fn

    ks = {"sdpa": sdpa(), "sdpa_efficient": sdpa("EFFICIENT_ATTENTION"), "sdpa_math": sdpa("MATH"),
          "explicit": vit._explicit_attention}
    if device == "cuda" and vit._compiled_flex() is not None:
        ks["flex"] = lambda q, k, v, b: vit._flex_with_bias(vit._compiled_flex(), q, k, v, b)
    return ks


def gold(q, k, v, b):
    return ((q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5 + b).softmax(-1) @ v


def inputs(device, dtype, bias_batch, B, H, T, hd, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, hd, generator=g, device=device).to(dtype) for _ in range(3))
    bias = 0.5 * torch.randn(bias_batch, H, T, T, generator=g, device=device)  # fp32, like the learned table
    grad_out = torch.randn(B, H, T, hd, generator=g, device=device).to(dtype)
    return q, k, v, bias, grad_out


def forward_backward(fn, q, k, v, bias, grad_out, cast=None):
    leaves = [(t.double() if cast == "double" else t.clone()).requires_grad_() for t in (q, k, v, bias)]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def _error(e: BaseException) -> str:
    lines = traceback.format_exception_only(type(e), e)
    return " ".join(" ".join(lines).split())[:600]


def accuracy(device: str, ks: dict, shape: tuple) -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for bias_batch in (1, shape[0]):
            args = inputs(device, dtype, bias_batch, *shape)
            ref = forward_backward(gold, *args, cast="double")
            for name, fn in ks.items():
                row = {"kernel": name, "dtype": str(dtype).replace("torch.", ""), "bias_batch": bias_batch}
                try:
                    got = forward_backward(fn, *args)
                    row.update({n: round(rel_err(g, r), 7) for n, g, r in zip(NAMES, got, ref)})
                except Exception as e:  # noqa: BLE001 - a kernel that fails is a result
                    row["error"] = _error(e)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def timing(device: str, ks: dict, shape: tuple, dtype, iters: int) -> list[dict]:
    rows = []
    args = inputs(device, dtype, 1, *shape)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for name, fn in ks.items():
        row = {"kernel": name, "dtype": str(dtype).replace("torch.", ""), "shape": list(shape)}
        try:
            for _ in range(2):
                forward_backward(fn, *args)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ts = []
            for _ in range(iters):
                sync()
                t = time.perf_counter()
                forward_backward(fn, *args)
                sync()
                ts.append(time.perf_counter() - t)
            row["ms"] = round(1e3 * statistics.median(ts), 3)
            if device == "cuda":
                row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        except Exception as e:  # noqa: BLE001
            row["error"] = _error(e)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--small", action="store_true", help="small shapes (a quick CPU run)")
    a = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the accuracy part
    torch.backends.cudnn.allow_tf32 = False
    ks = kernels(a.device)
    print(f"machine: {machine.describe(a.device)}; kernels: {', '.join(ks)}", flush=True)
    acc_shape = (2, 2, 17, 16) if a.small else (4, 6, 197, 64)
    time_shape = (4, 3, 65, 64) if a.small else (64, 12, 197, 64)
    doc = {"machine": machine.info(a.device), "torch": torch.__version__,
           "accuracy_shape_BHTd": list(acc_shape), "accuracy": accuracy(a.device, ks, acc_shape)}
    doc["timing"] = timing(a.device, ks, time_shape, torch.bfloat16 if a.device == "cuda" else torch.float32,
                           a.iters if not a.small else 3)
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
