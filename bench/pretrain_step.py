"""One BEiT pretraining step, ours vs HF transformers ``BeitForMaskedImageModeling``, in one process.

A step is forward + backward + AdamW step of backbone + MIM head on the same batch, mask and targets, with
the same architecture (shared relative position bias, LayerScale 0.1, drop path 0.1, no absolute
positions, same vocabulary), in each asked precision: ``auto`` (what ``train.precision=auto`` picks on this
machine, see :mod:`beit.precision`), ``fp32``, ``bf16`` (autocast) and, on CUDA, ``fp16``. Ours runs the head on
masked positions only; HF runs it on every patch and then keeps the masked logits. The two models are
timed alternately, step by step, so machine noise hits both alike; the median over ``--iters`` steps after
``--warmup`` steps is reported.

Also printed: the full step including the frozen tokenizer's ``encode`` (tiny: ``vq_32_small``, the tiny
BEiT preset's tokenizer; base: ``dalle_112``; ``--tokenizer`` picks another; random weights: the cost does
not depend on them), model FLOP utilisation against a large matmul timed in the same run (the machine's
ceiling for that dtype), and masks/s of :func:`beit.masking.block_mask`.

Every output starts with the machine (CPU model and ISA level or GPU, threads, torch: :mod:`beit.machine`).

    python bench/pretrain_step.py                       # tiny and base; auto, fp32 and bf16
    python bench/pretrain_step.py --configs tiny --iters 20 --dtype auto,fp32 --threads 2
    python bench/pretrain_step.py --configs base --device cuda --dtype bf16,fp16 --json out.json
    python bench/pretrain_step.py --configs tiny --dtype auto --tokenizer vq_32
    python bench/pretrain_step.py --configs base --device cuda --dtype bf16 --batch 128 \
        --largest-batch beit_base_patch16_224,beit_large_patch16_224    # MFU, largest batch that fits
    python bench/pretrain_step.py --dry-run                             # CI: checks the fields, one tiny step

MFU is printed per row: counted model FLOPs (forward + backward) per second over the GPU's dense datasheet
peak (``DATASHEET_PEAKS``), and on every device over the matmul ceiling measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beit import machine, precision  # noqa: E402
from beit.config import from_dict, to_dict  # noqa: E402
from beit.engine import autocast_context  # noqa: E402
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
    "tiny": Setup("tiny", "beit_tiny_patch4_32", "vq_32_small", batch=32, warmup=2, iters=8),
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


def make_batch(setup: Setup, model_cfg, tok_size: int, vocab: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, (h, w) = setup.batch, model_cfg.grid_size
    n = int(round(0.4 * h * w))
    masks = torch.stack([block_mask((h, w), n, min_block=16, generator=g) for _ in range(B)])
    batch = {
        "images": torch.randn(B, 3, model_cfg.img_size, model_cfg.img_size, generator=g),
        "tok_images": torch.rand(B, 3, tok_size, tok_size, generator=g),
        "mask": masks,  # (B, h, w), True = masked
        "ids": torch.randint(0, vocab, (B, h, w), generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def step_fns(setup: Setup, dtype: str, device: torch.device, compile_ours: bool = False, count_flops: bool = True,
             with_hf: bool = True):
    model_cfg = from_dict(type(get_preset(setup.preset)), {**to_dict(get_preset(setup.preset)), "drop_path_rate": 0.1})
    tok = Tokenizer(get_tokenizer_preset(setup.tokenizer)).eval().to(device)
    vocab, tok_size = tok.vocab_size, tok.cfg.img_size
    batch = make_batch(setup, model_cfg, tok_size, vocab, device)
    torch.manual_seed(0)
    ours = BEiTMethod.build(model_cfg, FixedIds(batch["ids"], vocab), BEiTConfig()).train().to(device)
    hf = hf_model(ours.model.cfg, vocab).train().to(device) if with_hf else None
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "fp16")

    def autocast(_dtype: str):
        return autocast_context(device, _dtype)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, weight_decay=0.05)
    run_ours = torch.compile(ours) if compile_ours else ours
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.05) if with_hf else None
    mask_flat = batch["mask"].flatten(1)
    labels = batch["ids"].flatten(1)[mask_flat]

    def ours_step() -> float:
        opt_ours.zero_grad(set_to_none=True)
        with autocast(dtype):
            loss, _ = run_ours(batch)
        scaler.scale(loss).backward()
        scaler.step(opt_ours)
        scaler.update()
        return float(loss.detach())

    def hf_step() -> float:
        opt_hf.zero_grad(set_to_none=True)
        with autocast(dtype):
            loss = hf(pixel_values=batch["images"], bool_masked_pos=mask_flat, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.step(opt_hf)
        scaler.update()
        return float(loss.detach())

    def tok_encode() -> None:  # as BEiTMethod.visual_tokens: fp32 whatever the step's precision (exact ids)
        with torch.autocast(device.type, enabled=False):
            tok.encode(batch["tok_images"])

    def flops(model_step_forward) -> float:
        """Matmul FLOPs of forward + backward (FlopCounterMode), plus attention where the counter missed it
        (SDPA's math path on CPU is not counted; the fused CUDA kernels are)."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            model_step_forward().backward()
        counted = fc.get_flop_counts().get("Global", {})
        if any("attention" in str(op) for op in counted):
            return fc.get_total_flops()
        T, D = model_cfg.num_patches + 1, model_cfg.embed_dim
        attn = 3 * model_cfg.depth * 4 * setup.batch * T * T * D  # QK^T and AV, forward and twice in backward
        return fc.get_total_flops() + attn

    f_ours = f_hf = float("nan")
    if count_flops:
        f_ours = flops(lambda: ours(batch)[0])
        f_hf = flops(lambda: hf(pixel_values=batch["images"], bool_masked_pos=mask_flat, labels=labels).loss)
    ours.zero_grad(set_to_none=True)
    if hf is not None:
        hf.zero_grad(set_to_none=True)
    return ours_step, hf_step, tok_encode, f_ours, f_hf


# Dense (no sparsity) tensor-core peaks from the vendors' datasheets, FLOP/s, for MFU on GPUs: a name matched
# as a substring of torch.cuda.get_device_name. bf16 and fp16 are equal on these cards; fp32 means TF32 off.
DATASHEET_PEAKS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100 80GB HBM3": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},  # SXM
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12},
}


def datasheet_peak(dtype: str, device: torch.device) -> float | None:
    """The card's dense datasheet peak for ``dtype`` (None on CPU or for an unlisted card)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p[dtype] for key, p in DATASHEET_PEAKS.items() if key in name and dtype in p), None)


def largest_batch(preset: str, dtype: str, device: torch.device, limit: int = 2048) -> int:
    """The largest power-of-two batch (from 8) whose BEiT pretraining step (backbone + MIM head, AdamW) fits in
    the device's memory in ``dtype``; 0 if even 8 does not."""
    best, batch = 0, 8
    while batch <= limit:
        setup = Setup("probe", preset, "dalle_112" if "224" in preset else "vq_32_small", batch, 0, 1)
        try:
            ours_step = step_fns(setup, dtype, device, count_flops=False, with_hf=False)[0]
            ours_step()
            best = batch
        except torch.OutOfMemoryError:
            break
        finally:
            ours_step = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        batch *= 2
    return best


def median_time(fn, n: int, device: torch.device) -> float:
    return statistics.median(timed(fn, device)[0] for _ in range(n))


def matmul_peak(dtype: str, device: torch.device, n: int = 2048, reps: int = 8) -> float:
    """FLOP/s of an n x n x n matmul, best of ``reps``: the ceiling a model step can approach here."""
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    a, b = torch.randn(n, n, dtype=dt, device=device), torch.randn(n, n, dtype=dt, device=device)
    a @ b
    return 2 * n**3 / min(timed(lambda: a @ b, device)[0] for _ in range(reps))


def masks_per_s(grid: tuple[int, int], budget: int, n: int = 2000) -> float:
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for _ in range(n):
        block_mask(grid, budget, generator=g)
    return n / (time.perf_counter() - t)


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call. CPU time is the steadier number on a shared machine."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    w, c = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - w, time.process_time() - c


def bench_one(setup: Setup, dtype: str, device: torch.device, compile_ours: bool, flops: tuple | None) -> dict:
    """Time ours and HF alternately in ``dtype``; returns one result row (FLOPs counted when ``flops`` is None)."""
    ours_step, hf_step, tok_encode, fo, fh = step_fns(setup, dtype, device, compile_ours, count_flops=flops is None)
    f_ours, f_hf = flops or (fo, fh)
    ours_step()  # first call: compiles when asked, not counted
    for _ in range(setup.warmup):
        ours_step()
        hf_step()
    t_ours, t_hf = [], []
    for _ in range(setup.iters):  # alternate, so load changes hit both
        t_ours.append(timed(ours_step, device))
        t_hf.append(timed(hf_step, device))
    w_ours, c_ours = (statistics.median(t[k] for t in t_ours) for k in (0, 1))
    w_hf, c_hf = (statistics.median(t[k] for t in t_hf) for k in (0, 1))
    tok_encode()
    t_tok = median_time(tok_encode, max(3, setup.iters // 2), device)
    B = setup.batch
    return {"config": setup.name, "preset": setup.preset, "dtype": dtype, "batch": B,
            "ours_img_s": B / w_ours, "hf_img_s": B / w_hf, "ours_over_hf": w_hf / w_ours,
            "ours_over_hf_cpu_time": c_hf / c_ours, "tokenizer": setup.tokenizer, "tokenizer_s": t_tok,
            "ours_plus_tokenizer_img_s": B / (w_ours + t_tok), "tokenizer_share": t_tok / w_ours,
            "ours_flops": f_ours, "hf_flops": f_hf, "ours_s": w_ours, "hf_s": w_hf}


def markdown_row(r: dict, peak: float) -> str:
    B = r["batch"]
    return (f"| {r['config']} ({r['preset']}) | {r['label']} | {B} | {r['ours_img_s']:.1f} | {r['hf_img_s']:.1f} | "
            f"**{r['ours_over_hf']:.2f}x** | {r['ours_over_hf_cpu_time']:.2f}x | "
            f"{r['ours_plus_tokenizer_img_s']:.1f} ({r['tokenizer']}: {r['tokenizer_s'] * 1e3:.0f} ms) | "
            f"{r['ours_flops'] / r['ours_s'] / 1e9:.0f} / {100 * r['ours_flops'] / r['ours_s'] / peak:.0f}% | "
            f"{r['hf_flops'] / r['hf_s'] / 1e9:.0f} / {100 * r['hf_flops'] / r['hf_s'] / peak:.0f}% | "
            f"{r['ours_flops'] / B / 1e9:.2f} / {r['hf_flops'] / B / 1e9:.2f} |")


TABLE_HEAD = ("| config | dtype | batch | ours img/s | HF img/s | ours/HF (wall) | ours/HF (CPU time) | "
              "ours + tokenizer img/s | ours GFLOP/s / MFU | HF GFLOP/s / MFU | GFLOP/img ours / HF |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,base", help="comma list of: " + ", ".join(SETUPS))
    ap.add_argument("--dtype", default="auto,fp32,bf16",
                    help="comma list of: auto (train.precision=auto's choice here), fp32, bf16, fp16 (CUDA)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--iters", type=int, default=0, help="timed steps per model (0: per-config default)")
    ap.add_argument("--warmup", type=int, default=-1, help="untimed steps per model (-1: per-config default)")
    ap.add_argument("--batch", type=int, default=0, help="batch size (0: per-config default)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--tokenizer", help="tokenizer preset for every config (default: vq_32_small tiny, dalle_112 base)")
    ap.add_argument("--json", metavar="PATH", help="also write the machine and every row as JSON here")
    ap.add_argument("--largest-batch", metavar="PRESETS", default="",
                    help="comma list of backbone presets (e.g. beit_base_patch16_224,beit_large_patch16_224): also "
                         "report the largest power-of-two batch whose step fits in memory, in the first --dtype")
    ap.add_argument("--dry-run", action="store_true", help="CI: tiny config, fp32, batch 2, one step (checks the output)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile our method (HF stays eager: not a like-for-like ratio; minutes to compile)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.configs, args.dtype, args.iters, args.warmup, args.batch = "tiny", "fp32", 1, 0, 2
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"machine: {machine.describe(device)}" + (", ours compiled" if args.compile else ""), flush=True)
    auto = precision.resolve("auto", device)
    print(f"train.precision=auto -> {auto.precision} ({auto.reason})", flush=True)
    resolved = {d: auto.precision if d == "auto" else d for d in args.dtype.split(",")}
    peaks = {d: matmul_peak(d, device) for d in set(resolved.values())}
    rows: list[dict] = []
    for name in args.configs.split(","):
        base = SETUPS[name]
        setup = Setup(base.name, base.preset, args.tokenizer or base.tokenizer, args.batch or base.batch,
                      base.warmup if args.warmup < 0 else args.warmup, args.iters or base.iters)
        flops = None
        for label, dtype in resolved.items():
            row = bench_one(setup, dtype, device, args.compile, flops)
            flops = (row["ours_flops"], row["hf_flops"])  # the same FLOPs in every dtype: count once
            row["label"] = f"auto ({dtype})" if label == "auto" else dtype
            row["gflop_per_image"] = row["ours_flops"] / row["batch"] / 1e9  # forward + backward, counted
            row["mfu_vs_matmul"] = row["ours_flops"] / row["ours_s"] / peaks[dtype]
            sheet = datasheet_peak(dtype, device)
            row["mfu"] = row["ours_flops"] / row["ours_s"] / sheet if sheet else None  # the card's dense peak
            rows.append(row)
            print(markdown_row(row, peaks[dtype]), flush=True)
    print(f"\nmachine: {machine.describe(device)}\n{TABLE_HEAD}")
    print("\n".join(markdown_row(r, peaks[r["dtype"]]) for r in rows))
    print("\nMFU: counted FLOPs of forward + backward (each model's own) per wall second over the matmul ceiling.")
    for d, p in peaks.items():
        print(f"matmul ceiling ({d}, 2048^3, same process): {p / 1e9:.0f} GFLOP/s")
    for r in rows:
        sheet = f"{100 * r['mfu']:.1f}% of the datasheet's dense peak" if r["mfu"] is not None else "no datasheet peak"
        print(f"MFU {r['config']} {r['label']} batch {r['batch']}: {r['gflop_per_image']:.2f} GFLOP/image (fwd+bwd), "
              f"{r['ours_img_s']:.1f} img/s, {100 * r['mfu_vs_matmul']:.1f}% of the measured matmul ceiling, {sheet}")
    largest = {}
    for preset in filter(None, args.largest_batch.split(",")):  # in the first precision asked (auto's choice)
        d = next(iter(resolved.values()))
        largest[f"{preset}/{d}"] = largest_batch(preset, d, device)
        print(f"largest batch {preset} {d}: {largest[f'{preset}/{d}']}", flush=True)
    for name in args.configs.split(","):
        by = {r["label"].split(" ")[0]: r for r in rows if r["config"] == name}
        if "auto" in by and "fp32" in by:
            print(f"{name}: auto / fp32 = {by['fp32']['ours_s'] / by['auto']['ours_s']:.2f}x (ours, images/s)")
    print(f"block_mask 14x14/75: {masks_per_s((14, 14), 75):.0f} masks/s; "
          f"8x8/26: {masks_per_s((8, 8), 26):.0f} masks/s (one core)")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine.info(device), "auto": auto.__dict__,
                                               "matmul_ceiling_flops": peaks, "rows": rows,
                                               "largest_batch": largest}, indent=1))
    return rows


if __name__ == "__main__":
    main()
