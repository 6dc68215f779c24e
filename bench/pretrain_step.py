"""One BEiT pretraining step, ours vs HF transformers ``BeitForMaskedImageModeling``, in one process.

A step is forward + backward + AdamW step of backbone + MIM head on the same batch, mask and targets, with
the same architecture (shared relative position bias, LayerScale 0.1, drop path 0.1, no absolute
positions, same vocabulary), in fp32 and under ``torch.autocast("cpu", bfloat16)``. Ours runs the head on
masked positions only; HF runs it on every patch and then keeps the masked logits. The two models are
timed alternately, step by step, so machine noise hits both alike; the median over ``--iters`` steps after
``--warmup`` steps is reported.

Also printed: the full step including the frozen tokenizer's ``encode`` (``dvae_32`` for tiny,
``dalle_112`` for base; random weights: the cost does not depend on them), model FLOP utilisation against
a large matmul timed in the same run (the machine's ceiling for that dtype), and masks/s of
:func:`beit.masking.block_mask`.

    python bench/pretrain_step.py                       # tiny and base, bf16 and fp32
    python bench/pretrain_step.py --configs tiny --iters 20 --dtype bf16 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beit.config import from_dict, to_dict  # noqa: E402
from beit.masking import block_mask  # noqa: E402
from beit.methods.beit import BEiTConfig, BEiTMethod  # noqa: E402
from beit.models.presets import get_preset  # noqa: E402
from beit.models.tokenizer import Tokenizer, get_tokenizer_preset  # noqa: E402


@dataclass
class Setup:
    name: str
    preset: str
    tokenizer: str
    batch: int
    warmup: int
    iters: int


SETUPS = {
    "tiny": Setup("tiny", "beit_tiny_patch4_32", "dvae_32", batch=32, warmup=2, iters=8),
    "base": Setup("base", "beit_base_patch16_224", "dalle_112", batch=8, warmup=1, iters=3),
}


class FixedIds:
    """A 'tokenizer' returning precomputed ids: isolates backbone + head from the tokenizer's cost."""

    def __init__(self, ids: torch.Tensor, vocab_size: int) -> None:
        self.ids = ids
        self.vocab_size = vocab_size

    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        return self.ids


def hf_model(model_cfg, vocab: int):
    from transformers import BeitConfig, BeitForMaskedImageModeling

    D = model_cfg.embed_dim
    cfg = BeitConfig(
        vocab_size=vocab, image_size=model_cfg.img_size, patch_size=model_cfg.patch_size,
        hidden_size=D, num_hidden_layers=model_cfg.depth, num_attention_heads=model_cfg.num_heads,
        intermediate_size=int(D * model_cfg.mlp_ratio), hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, layer_norm_eps=model_cfg.layer_norm_eps, use_mask_token=True,
        use_absolute_position_embeddings=False, use_relative_position_bias=False,
        use_shared_relative_position_bias=True, layer_scale_init_value=model_cfg.layer_scale_init,
        drop_path_rate=model_cfg.drop_path_rate, use_mean_pooling=False,
    )
    return BeitForMaskedImageModeling._from_config(cfg, attn_implementation="sdpa")


def autocast(dtype: str):
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_batch(setup: Setup, model_cfg, tok_size: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, (h, w) = setup.batch, model_cfg.grid_size
    n = int(round(0.4 * h * w))
    masks = torch.stack([block_mask((h, w), n, min_block=16, generator=g) for _ in range(B)])
    return {
        "images": torch.randn(B, 3, model_cfg.img_size, model_cfg.img_size, generator=g),
        "tok_images": torch.rand(B, 3, tok_size, tok_size, generator=g),
        "mask": masks,  # (B, h, w), True = masked
        "ids": torch.randint(0, vocab, (B, h, w), generator=g),
    }


def step_fns(setup: Setup, dtype: str, compile_ours: bool = False, count_flops: bool = True):
    model_cfg = from_dict(type(get_preset(setup.preset)), {**to_dict(get_preset(setup.preset)), "drop_path_rate": 0.1})
    tok = Tokenizer(get_tokenizer_preset(setup.tokenizer)).eval()
    vocab, tok_size = tok.vocab_size, tok.cfg.img_size
    batch = make_batch(setup, model_cfg, tok_size, vocab)
    torch.manual_seed(0)
    ours = BEiTMethod.build(model_cfg, FixedIds(batch["ids"], vocab), BEiTConfig()).train()
    hf = hf_model(ours.model.cfg, vocab).train()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, weight_decay=0.05)
    run_ours = torch.compile(ours) if compile_ours else ours
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.05)
    mask_flat = batch["mask"].flatten(1)
    labels = batch["ids"].flatten(1)[mask_flat]

    def ours_step() -> float:
        opt_ours.zero_grad(set_to_none=True)
        with autocast(dtype):
            loss, _ = run_ours(batch)
        loss.backward()
        opt_ours.step()
        return float(loss.detach())

    def hf_step() -> float:
        opt_hf.zero_grad(set_to_none=True)
        with autocast(dtype):
            loss = hf(pixel_values=batch["images"], bool_masked_pos=mask_flat, labels=labels).loss
        loss.backward()
        opt_hf.step()
        return float(loss.detach())

    def tok_encode() -> None:
        with autocast(dtype):
            tok.encode(batch["tok_images"])

    def flops(model_step_forward) -> float:
        """Matmul FLOPs of forward + backward (FlopCounterMode) plus attention (SDPA is not counted on CPU)."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            model_step_forward().backward()
        T, D = model_cfg.num_patches + 1, model_cfg.embed_dim
        attn = 3 * model_cfg.depth * 4 * setup.batch * T * T * D  # QK^T and AV, forward and twice in backward
        return fc.get_total_flops() + attn

    f_ours = f_hf = float("nan")
    if count_flops:
        f_ours = flops(lambda: ours(batch)[0])
        f_hf = flops(lambda: hf(pixel_values=batch["images"], bool_masked_pos=mask_flat, labels=labels).loss)
    ours.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)
    return ours_step, hf_step, tok_encode, f_ours, f_hf


def median_time(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def matmul_peak(dtype: str, n: int = 2048, reps: int = 8) -> float:
    """FLOP/s of an n x n x n matmul, best of ``reps``: the ceiling a model step can approach here."""
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    a @ b
    return 2 * n**3 / min(timed(lambda: a @ b)[0] for _ in range(reps))


def masks_per_s(grid: tuple[int, int], budget: int, n: int = 2000) -> float:
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for _ in range(n):
        block_mask(grid, budget, generator=g)
    return n / (time.perf_counter() - t)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call. CPU time is the steadier number on a shared machine."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,base", help="comma list of: " + ", ".join(SETUPS))
    ap.add_argument("--dtype", default="bf16,fp32", help="comma list of: bf16, fp32")
    ap.add_argument("--iters", type=int, default=0, help="timed steps per model (0: per-config default)")
    ap.add_argument("--warmup", type=int, default=-1, help="untimed steps per model (-1: per-config default)")
    ap.add_argument("--batch", type=int, default=0, help="batch size (0: per-config default)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile our method (HF stays eager: not a like-for-like ratio; minutes to compile)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads" + (", ours compiled" if args.compile else ""))
    dtypes = args.dtype.split(",")
    peaks = {d: matmul_peak(d) for d in dtypes}
    rows = []
    for name in args.configs.split(","):
        base = SETUPS[name]
        setup = Setup(base.name, base.preset, base.tokenizer, args.batch or base.batch,
                      base.warmup if args.warmup < 0 else args.warmup, args.iters or base.iters)
        f_ours = f_hf = float("nan")
        for i, dtype in enumerate(dtypes):
            ours_step, hf_step, tok_encode, fo, fh = step_fns(setup, dtype, args.compile, count_flops=i == 0)
            if i == 0:  # the same FLOPs in every dtype: count once
                f_ours, f_hf = fo, fh
            ours_step()  # first call: compiles when asked, not counted
            for _ in range(setup.warmup):
                ours_step()
                hf_step()
            t_ours, t_hf = [], []
            for _ in range(setup.iters):  # alternate, so load changes hit both
                t_ours.append(timed(ours_step))
                t_hf.append(timed(hf_step))
            w_ours, c_ours = (statistics.median(t[k] for t in t_ours) for k in (0, 1))
            w_hf, c_hf = (statistics.median(t[k] for t in t_hf) for k in (0, 1))
            tok_encode()
            t_tok = median_time(tok_encode, max(3, setup.iters // 2))
            B = setup.batch
            rows.append(
                f"| {name} ({setup.preset}) | {dtype} | {B} | {B / w_ours:.1f} | {B / w_hf:.1f} | "
                f"**{w_hf / w_ours:.2f}x** | {c_hf / c_ours:.2f}x | "
                f"{B / (w_ours + t_tok):.1f} ({setup.tokenizer}: {t_tok * 1e3:.0f} ms) | "
                f"{f_ours / w_ours / 1e9:.0f} / {100 * f_ours / w_ours / peaks[dtype]:.0f}% | "
                f"{f_hf / w_hf / 1e9:.0f} / {100 * f_hf / w_hf / peaks[dtype]:.0f}% | "
                f"{f_ours / B / 1e9:.2f} / {f_hf / B / 1e9:.2f} |"
            )
            print(rows[-1], flush=True)

    print()
    print("| config | dtype | batch | ours img/s | HF img/s | ours/HF (wall) | ours/HF (CPU time) | "
          "ours + tokenizer img/s | ours GFLOP/s / MFU | HF GFLOP/s / MFU | GFLOP/img ours / HF |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("MFU: counted FLOPs of forward + backward (each model's own) per wall second over the matmul ceiling.")
    for d, p in peaks.items():
        print(f"matmul ceiling ({d}, 2048^3, same process): {p / 1e9:.0f} GFLOP/s")
    print(f"block_mask 14x14/75: {masks_per_s((14, 14), 75):.0f} masks/s; "
          f"8x8/26: {masks_per_s((8, 8), 26):.0f} masks/s (one core)")


if __name__ == "__main__":
    main()
