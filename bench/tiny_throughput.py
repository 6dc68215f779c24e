"""Images/s of the tiny presets' full training step, against the arithmetic and against the peer, in one process.

Three models (issue 25): the demo's MAE (``beit demo``'s pretraining: ``mae_tiny_patch4_32`` with
:data:`beit.demo.plan.DEMO_ARCH`, 96 wide, 4 deep, at the default demo's batch), ``mae_tiny_patch4_32`` and
``beit_tiny_patch4_32`` at their presets' batch. A step is what :meth:`beit.engine.Trainer.optimizer_step`
does: forward under the run's autocast, backward, the loss and metrics read as floats, gradient clipping when
the recipe clips, the optimiser that :func:`beit.optim.build_optimizer` builds, ``zero_grad``. BEiT's step
includes its frozen tokenizer (``vq_32_small``, random weights: the cost does not depend on them). Data
loading is not in the step (``beit pretrain`` logs ``data_time`` beside ``step_time``; see the notebook).

Reported per model and precision (fp32 and bf16 autocast):

- images/s of ours, median over ``--iters`` steps after ``--warmup``;
- achieved GFLOP/s: forward + backward FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` (CPU
  flash attention, which the counter misses, is added with its formula) over the median step time, and
  that as a fraction of the machine's matmul rate in the same dtype (a 2048^3 matmul timed in this process:
  :func:`pretrain_step.matmul_peak`);
- the peer: the same-size model in HF transformers (``ViTMAEForPreTraining``; ``BeitForMaskedImageModeling``,
  as ``bench/pretrain_step.py``) with a plain loop (``torch.optim.AdamW`` with its defaults, eager), the same
  batch, and for BEiT the same tokenizer call; its images/s and ours over it.

``--variants`` times several ways of running our step, interleaved with each other and with the peer step by
step (machine noise hits all alike; the machine may be shared): ``engine`` (what the engine does now),
``loop`` / ``foreach`` / ``fused`` (the AdamW implementation forced), ``compiled`` (``torch.compile`` of the
method; its compile seconds are printed, with how many graphs the inductor cache already held).

Every output starts with the machine (CPU model, ISA level, threads, torch: :mod:`beit.machine`).

    python bench/tiny_throughput.py                                   # all three, fp32 and bf16
    python bench/tiny_throughput.py --models demo_mae --dtype bf16 --variants loop,fused,compiled --threads 1
    python bench/tiny_throughput.py --dry-run                         # seconds: a tiny model, for the CI test
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain_step import hf_model, matmul_peak, timed  # noqa: E402 - the peer BEiT, the ceiling, the clock

from beit import machine  # noqa: E402
from beit.demo.plan import DEMO_ARCH, DEMO_PRETRAIN, make_plan  # noqa: E402
from beit.engine import autocast_context  # noqa: E402
from beit.masking import MaskGenerator  # noqa: E402
from beit.methods.base import hooks  # noqa: E402
from beit.methods.beit import BEiTMethod  # noqa: E402
from beit.methods.mae import MAEMethod  # noqa: E402
from beit.models.tokenizer import Tokenizer, get_tokenizer_preset  # noqa: E402
from beit.optim import build_optimizer  # noqa: E402
from beit.tasks.pretrain import build_config  # noqa: E402

DEMO_MINUTES = 10.0  # ``beit demo``'s default --minutes: its plan's batch
# name -> (preset, overrides, batch: None = the preset's)
MODELS: dict[str, tuple[str, list[str], int | None]] = {
    "demo_mae": ("mae_tiny_patch4_32", [*DEMO_ARCH, *DEMO_PRETRAIN["mae"]], make_plan(DEMO_MINUTES).batch),
    "mae_tiny": ("mae_tiny_patch4_32", [], None),
    "beit_tiny": ("beit_tiny_patch4_32", [], None),
}
DRY_ARCH = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2"]
DRY_METHOD = {"mae": ["mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2"], "beit": []}
VARIANTS = ("engine", "loop", "foreach", "fused", "compiled")


@dataclass
class Setup:
    """One model, built as ``beit pretrain`` builds it: config, method, optimiser, a batch."""

    name: str
    cfg: object
    method: torch.nn.Module
    batch: dict
    tokenizer: Tokenizer | None


def build_setup(name: str, batch_size: int = 0, dry_run: bool = False, seed: int = 0) -> Setup:
    preset, overrides, batch = MODELS[name]
    method_name = "beit" if preset.startswith("beit") else "mae"
    overrides = overrides + (DRY_ARCH + DRY_METHOD[method_name] if dry_run else [])
    bs = batch_size or (4 if dry_run else batch)
    if bs:
        overrides = [*overrides, f"train.batch_size={bs}"]
    cfg = build_config(preset, overrides=overrides)
    B, g = cfg.train.batch_size, torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    size = cfg.model.img_size
    images = torch.randn(B, 3, size, size, generator=g)
    if cfg.method == "mae":
        method = MAEMethod.build(cfg.model, cfg.mae)
        n = method.encoder.patch_embed.num_patches
        return Setup(name, cfg, method, {"images": images, "noise": torch.rand(B, n, generator=g)}, None)
    tok = Tokenizer(get_tokenizer_preset(cfg.tokenizer_preset)).eval()
    method = BEiTMethod.build(cfg.model, tok, cfg.beit)
    masks = MaskGenerator(method.model.grid_size, cfg.beit.masking_config())
    tsize = tok.cfg.img_size
    batch = {"images": images, "tok_images": torch.rand(B, 3, tsize, tsize, generator=g),
             "mask": torch.stack([masks(generator=g) for _ in range(B)])}
    return Setup(name, cfg, method, batch, tok)


def make_optimizer(method: torch.nn.Module, cfg, impl: str) -> torch.optim.Optimizer:
    """The engine's optimiser (``impl="engine"``), or the same groups with AdamW's implementation forced."""
    opt = build_optimizer(hooks(method).param_groups(cfg.optim), cfg.optim)
    if impl == "engine":
        return opt
    flags = {"loop": dict(foreach=False, fused=False), "foreach": dict(foreach=True, fused=False),
             "fused": dict(foreach=False, fused=True)}[impl]
    for group in opt.param_groups:
        group.update(flags)
    return opt


def engine_step(model, optimizer, batch: dict, precision: str, clip: float) -> float:
    """What ``Trainer.optimizer_step`` does for one micro-batch on CPU (no DDP, no scaler: fp16 is CUDA-only)."""
    with autocast_context(torch.device("cpu"), precision):
        loss, metrics = model(batch)
    loss.backward()
    value = float(loss.detach())
    for v in metrics.values():
        float(v)
    if clip > 0:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        float(torch.nn.utils.clip_grad_norm_(params, clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value


def profile_model(name: str, precision: str, args) -> dict:
    """Where one step's time goes (torch.profiler over ``--iters`` steps of the engine variant): phases
    (forward, backward, optimiser with clipping, reading the loss), aten op calls per step, self-CPU by op,
    and the op-dispatch floor (calls x the time of a one-element op with autograd). Printed and returned."""
    from torch.profiler import ProfilerActivity, profile, record_function

    setup = build_setup(name, args.batch, args.dry_run)
    cfg, method, batch = setup.cfg, setup.method, setup.batch
    opt, clip, cpu = make_optimizer(method, cfg, "engine"), cfg.optim.clip_grad, torch.device("cpu")

    def step():
        with record_function("phase: forward"), autocast_context(cpu, precision):
            loss, metrics = method(batch)
        with record_function("phase: backward"):
            loss.backward()
        with record_function("phase: read loss and metrics"):
            float(loss.detach()), [float(v) for v in metrics.values()]
        with record_function("phase: optimizer (clip, AdamW, zero_grad)"):
            if clip > 0:
                float(torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
    for _ in range(max(1, args.warmup)):
        step()
    wall = statistics.median(timed(step, cpu)[0] for _ in range(args.iters))
    n = args.iters
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    events = prof.key_averages()
    phases = {e.key[7:]: e.cpu_time_total / n / 1e3 for e in events if e.key.startswith("phase: ")}
    ops = [e for e in events if e.key.startswith("aten::")]
    top_level = sum(e.count for e in ops if e.key not in NESTED_OPS) / n
    one = torch.ones(1, requires_grad=True)
    tiny_op_us = 1e6 * statistics.median(timed(lambda: one * 2.0, cpu)[0] for _ in range(200))
    out = {"model": name, "precision": precision, "threads": torch.get_num_threads(), "step_ms": 1e3 * wall,
           "phases_ms": phases, "pieces_ms": piece_times(setup, precision, args.iters), "aten_calls_per_step": sum(e.count for e in ops) / n,
           "aten_calls_per_step_top_level": top_level, "one_element_op_us": tiny_op_us,
           "dispatch_floor_ms": top_level * tiny_op_us / 1e3,
           "top_self_cpu_ms": {e.key: round(e.self_cpu_time_total / n / 1e3, 2) for e in
                               sorted(ops, key=lambda e: -e.self_cpu_time_total)[:12]},
           "calls_per_step": {e.key: e.count // n for e in sorted(ops, key=lambda e: -e.count)[:12]}}
    print(json.dumps(out), flush=True)
    return out


def piece_times(setup: Setup, precision: str, iters: int) -> dict[str, float]:
    """Forward-only pieces of the method's step, timed alone (ms, median): masking, targets, loss; BEiT's
    tokenizer call."""
    from beit.methods.mae import mae_loss, random_masking
    from beit.methods.pixels import pixel_targets

    m, b, cpu = setup.method, setup.batch, torch.device("cpu")
    if setup.cfg.method == "mae":
        target = pixel_targets(b["images"], m.patch_size, True)
        _, _, mask = random_masking(b["noise"], m.cfg.mask_ratio)
        fns = {"masking (random_masking)": lambda: random_masking(b["noise"], m.cfg.mask_ratio),
               "targets (pixel_targets)": lambda: pixel_targets(b["images"], m.patch_size, True),
               "loss (mae_loss)": lambda: mae_loss(target + 0.1, target, mask)}
    else:
        fns = {"tokenizer (visual_tokens)": lambda: m.visual_tokens(b["tok_images"]),
               "mask to bool": lambda: b["mask"].flatten(1).bool()}
    with torch.no_grad(), autocast_context(cpu, precision):
        return {k: 1e3 * statistics.median(timed(fn, cpu)[0] for _ in range(max(3, iters))) for k, fn in fns.items()}


# aten calls that other aten calls make (counted in the profile, but not a separate dispatch from Python)
NESTED_OPS = {"aten::empty", "aten::empty_strided", "aten::copy_", "aten::_to_copy", "aten::view", "aten::as_strided",
              "aten::resolve_conj", "aten::_local_scalar_dense", "aten::expand", "aten::_reshape_alias",
              "aten::fill_", "aten::zero_", "aten::result_type", "aten::detach", "aten::alias"}


def hf_mae(cfg):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    m, e = cfg.model, cfg.mae
    hcfg = ViTMAEConfig(
        image_size=m.img_size, patch_size=m.patch_size, hidden_size=m.embed_dim, num_hidden_layers=m.depth,
        num_attention_heads=m.num_heads, intermediate_size=int(m.embed_dim * m.mlp_ratio), hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=m.layer_norm_eps, qkv_bias=True,
        decoder_hidden_size=e.decoder_dim, decoder_num_hidden_layers=e.decoder_depth,
        decoder_num_attention_heads=e.decoder_heads, decoder_intermediate_size=int(e.decoder_dim * e.decoder_mlp_ratio),
        mask_ratio=e.mask_ratio, norm_pix_loss=e.norm_pix_loss)
    return ViTMAEForPreTraining._from_config(hcfg, attn_implementation="sdpa")


def peer_fns(setup: Setup):
    """(peer module, its forward -> loss): HF's MAE or BEiT, fed the same batch (BEiT: the same tokenizer)."""
    cfg, batch = setup.cfg, setup.batch
    if cfg.method == "mae":
        peer = hf_mae(cfg).train()
        return peer, lambda: peer(pixel_values=batch["images"], noise=batch["noise"]).loss
    peer = hf_model(setup.method.model.cfg, setup.tokenizer.vocab_size).train()
    mask = batch["mask"].flatten(1)

    def forward():
        with torch.autocast("cpu", enabled=False):
            ids = setup.tokenizer.encode(batch["tok_images"]).flatten(1)
        return peer(pixel_values=batch["images"], bool_masked_pos=mask, labels=ids[mask]).loss
    return peer, forward


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(forward) -> int:
    """Forward + backward FLOPs of ``forward() -> loss`` (CPU flash attention counted too: the counter's own
    table only knows the CUDA kernels)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    extra = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
             aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=extra) as fc:
        forward().backward()
    return fc.get_total_flops()


def inductor_cache_state() -> str:
    """How many compiled graphs earlier processes left in the cache torch.compile reads (any model's: 0 means
    cold; after a run of the same model, its own are among them), and where it lives."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    d = Path(cache_dir())
    n = sum(1 for f in d.glob("fxgraph/*/*") if f.is_dir()) if d.is_dir() else 0
    return f"{n} graphs ({d})"


def bench_model(name: str, precision: str, variants: list[str], args) -> list[dict]:
    """Every variant of ours and the peer, interleaved step by step; one row per variant."""
    setup = build_setup(name, args.batch, args.dry_run)
    cfg, B = setup.cfg, setup.cfg.train.batch_size
    clip = cfg.optim.clip_grad
    flops = count_flops(lambda: setup.method(setup.batch)[0])
    setup.method.zero_grad(set_to_none=True)
    runs: dict[str, tuple] = {}
    compile_s = cache = None
    for v in variants:
        method = copy.deepcopy(setup.method)
        opt = make_optimizer(method, cfg, "engine" if v == "compiled" else v)
        model = method
        if v == "compiled":
            cache = inductor_cache_state()
            model = torch.compile(method)
            t = time.perf_counter()
            engine_step(model, opt, setup.batch, precision, clip)
            compile_s = time.perf_counter() - t
        runs[v] = (model, opt)
    peer = peer_flops = None
    if not args.no_peer:
        torch.manual_seed(0)
        module, forward = peer_fns(setup)
        peer_flops = count_flops(forward)
        module.zero_grad(set_to_none=True)
        peer_opt = torch.optim.AdamW(module.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                     weight_decay=cfg.optim.weight_decay)

        def peer_step():
            with autocast_context(torch.device("cpu"), precision):
                loss = forward()
            loss.backward()
            float(loss.detach())
            peer_opt.step()
            peer_opt.zero_grad(set_to_none=True)
        peer = peer_step
    steps = {v: (lambda m=m, o=o: engine_step(m, o, setup.batch, precision, clip)) for v, (m, o) in runs.items()}
    if peer is not None:
        steps["peer"] = peer
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.iters):
        for k, fn in steps.items():
            times[k].append(timed(fn, torch.device("cpu"))[0])
    med = {k: statistics.median(t) for k, t in times.items()}
    rows = []
    for v in variants:
        row = {"model": name, "preset": MODELS[name][0], "precision": precision, "variant": v, "batch": B,
               "img_s": B / med[v], "step_ms": 1e3 * med[v], "gflop_per_step": flops / 1e9,
               "gflop_s": flops / med[v] / 1e9}
        if peer is not None:
            row.update(peer_img_s=B / med["peer"], ours_over_peer=med["peer"] / med[v],
                       peer_gflop_s=peer_flops / med["peer"] / 1e9)
        if v == "compiled":
            row.update(compile_s=compile_s, inductor_cache=cache)
        rows.append(row)
    return rows


def markdown_row(r: dict, peak: float) -> str:
    peer = (f"{r['peer_img_s']:.0f} | **{r['ours_over_peer']:.2f}x**" if "peer_img_s" in r else "- | -")
    comp = f" (compile {r['compile_s']:.1f} s, {r['inductor_cache'].split(' (')[0]} cached)" if "compile_s" in r else ""
    return (f"| {r['model']} | {r['precision']} | {r['variant']}{comp} | {r['batch']} | **{r['img_s']:.0f}** | "
            f"{r['step_ms']:.1f} | {r['gflop_s']:.0f} | {100 * r['gflop_s'] * 1e9 / peak:.1f}% | {peer} |")


TABLE_HEAD = ("| model | precision | variant | batch | images/s | step ms | GFLOP/s | of matmul rate | "
              "peer images/s | ours/peer |\n|---|---|---|---|---|---|---|---|---|---|")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of: " + ", ".join(MODELS))
    ap.add_argument("--dtype", default="fp32,bf16", help="comma list of: fp32, bf16 (autocast)")
    ap.add_argument("--variants", default="engine", help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--iters", type=int, default=15, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    ap.add_argument("--batch", type=int, default=0, help="batch size for every model (0: each model's own)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--no-peer", action="store_true", help="skip the HF peer")
    ap.add_argument("--json", metavar="PATH", help="also write the machine, the ceilings and every row here")
    ap.add_argument("--profile", action="store_true", help="instead: where a step's time goes (torch.profiler)")
    ap.add_argument("--dry-run", action="store_true", help="a tiny model, 1 step: checks the script runs")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.iters, args.warmup = 1, 0
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    print(f"machine: {machine.describe(cpu)}", flush=True)
    dtypes = args.dtype.split(",")
    if args.profile:
        return [profile_model(name, d, args) for name in args.models.split(",") for d in dtypes]
    n = 256 if args.dry_run else 2048
    peaks = {d: matmul_peak(d, cpu, n=n, reps=2 if args.dry_run else 8) for d in dtypes}
    for d, p in peaks.items():
        print(f"matmul rate ({d}, {n}^3, this process): {p / 1e9:.0f} GFLOP/s", flush=True)
    print(TABLE_HEAD, flush=True)
    rows: list[dict] = []
    for name in args.models.split(","):
        for d in dtypes:
            for r in bench_model(name, d, args.variants.split(","), args):
                rows.append(r)
                r["of_matmul_rate"] = r["gflop_s"] * 1e9 / peaks[d]
                print(markdown_row(r, peaks[d]), flush=True)
    print(f"medians of {args.iters} interleaved steps after {args.warmup} warm-up; GFLOP/s: FlopCounterMode "
          "forward + backward per step over the median step; peer: HF transformers, plain AdamW, eager")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine.info(cpu), "matmul_flops": peaks, "rows": rows},
                                              indent=1))
    return rows


if __name__ == "__main__":
    main()
