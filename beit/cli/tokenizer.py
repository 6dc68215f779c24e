"""``beit tokenizer train | eval | convert-dalle | convert-beit2``: the visual tokenizer (:mod:`beit.tokenizers`)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from .. import recipes
from .common import add_train_flags, emit, overrides, print_config, run_options
from .summary import table


def cmd_train(args: argparse.Namespace) -> int:
    from ..tokenizers import train_tokenizer
    from ..tokenizers.train import build_config

    ov = overrides(args, {"limit": "data.limit", "val_data": "data.val_path"})
    preset = args.preset or (None if args.config else "vqkd_32" if args.objective == "vqkd" else "vq_32")
    cfg = build_config(preset, args.config, ov, objective=args.objective, teacher=args.teacher)
    if args.data is not None:
        cfg.data.path = args.data
    if print_config(args, cfg):
        return 0
    run = train_tokenizer(args.data, args.out, cfg=cfg, **run_options(args))
    if cfg.model.quantizer == "vqkd":  # a semantic tokenizer distilled from --teacher (BEiT v2)
        emit(args, {"run": str(run)}, f"VQ-KD tokenizer: {run}\nnext: beit pretrain --method beit --data "
                                      f"{shlex.quote(str(args.data))} --tokenizer {shlex.quote(str(run))} --out runs/beit2")
        return 0
    data, human = tokenizer_summary(run, cfg, args.data)
    emit(args, data, human)
    return 0


def tokenizer_summary(run: Path, cfg, data_dir: str) -> tuple[dict, str]:
    """What a tokenizer run gives: its last training metrics, the held-out evaluation, files, the next command."""
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    train_rows = [r for r in rows if "loss" in r]
    last = train_rows[-1] if train_rows else {}
    ev = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else {}
    step, total = last.get("step", 0), cfg.train.steps
    data = {"run": str(run), "step": step, "status": "done" if not total or step >= total else "stopped",
            **{f"train_{k}": round(last[k], 4) for k in ("loss", "psnr", "perplexity") if k in last},
            **({"eval": ev} if ev else {})}
    m = cfg.model
    lines = [f"tokenizer: {data['status']} at step {step} -> {run}",
             f"  a {m.quantizer} tokenizer: {m.img_size} px -> {m.grid_size[0]}x{m.grid_size[1]} tokens, "
             f"vocabulary {m.vocab_size}"]
    shown = [(f"training {k} (last window)", f"{last[k]:.4g}") for k in ("psnr", "perplexity", "loss") if k in last]
    shown += [(f"held-out {k}", f"{v:.4g}") for k, v in ev.items() if k != "step" and isinstance(v, (int, float))]
    if shown:
        lines.append(table(shown))
    if not ev:
        lines.append("  (no held-out numbers: pass --val-data DIR, or run `beit tokenizer eval`)")
    files = [p for p in ("tokenizer.safetensors", "reconstructions.png", "loss.png", "eval.json", "metrics.jsonl")
             if (run / p).exists()]
    lines.append("files: " + ", ".join(str(run / p) for p in files))
    lines.append(f"next: beit pretrain --method beit --data {shlex.quote(str(data_dir))} --tokenizer "
                 f"{shlex.quote(str(run))} --out runs/pretrain")
    return data, "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..tokenizers import evaluate_cmd

    res = evaluate_cmd(args.tokenizer, args.data, limit=args.limit or 0, grid=args.grid, batch_size=args.batch_size,
                       teacher=args.teacher)
    human = f"tokenizer {args.tokenizer} on {args.data}:\n" + table(
        [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in res.items()])
    emit(args, res, human)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ..tokenizers import convert_dalle

    out = convert_dalle(args.encoder, args.decoder, args.out)
    emit(args, {"tokenizer": str(out)}, f"tokenizer written to {out}\nnext: beit tokenizer eval --tokenizer "
                                           f"{shlex.quote(str(out))} --data IMAGES")
    return 0


def cmd_convert_beit2(args: argparse.Namespace) -> int:
    from ..tokenizers import convert_beit2

    out = convert_beit2(args.checkpoint, args.out, encoder_heads=args.heads, decoder_heads=args.heads,
                        overwrite=args.overwrite)
    print(json.dumps({"tokenizer": str(out)}))
    return 0


def add_commands(sub) -> None:
    tok = sub.add_parser("tokenizer", help="train, evaluate or convert a visual tokenizer (dVAE, VQ-VAE, VQ-KD)")
    tsub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = tsub.add_parser("train", help="train a discrete VAE on a folder of images")
    t.add_argument("--data", required=True, help="folder of images")
    t.add_argument("--out", required=True, help="run directory: tokenizer.safetensors, metrics, reconstructions.png")
    t.add_argument("--limit", type=int, help="use only the first N images (data.limit)")
    t.add_argument("--val-data", help="held-out folder evaluated each epoch and at the end (data.val_path)")
    t.add_argument("--objective", choices=["gumbel", "vq", "vqkd"],
                   help="gumbel (dVAE) | vq (VQ-VAE) | vqkd (BEiT v2: distil --teacher's features into tokens, "
                        "preset vqkd_32 by default); default: the preset's quantizer")
    t.add_argument("--teacher", help="vqkd: the backbone to distil (a pretraining run, HF/timm/official weights)")
    add_train_flags(t, sorted({*recipes.TOKENIZER_RUNS, *recipes.VQKD_RUNS}))
    t.set_defaults(func=cmd_train)
    t = tsub.add_parser("eval", help="PSNR (VQ-KD: teacher cosine), codebook usage, perplexity on a held-out "
                                     "folder (JSON)")
    t.add_argument("--tokenizer", required=True, help="tokenizer run or directory")
    t.add_argument("--data", required=True, help="folder of images")
    t.add_argument("--limit", type=int, help="use only the first N images")
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--grid", help="also write a PNG of originals above reconstructions here")
    t.add_argument("--teacher", help="VQ-KD: the teacher to compare with (default: the one its run recorded)")
    t.set_defaults(func=cmd_eval)
    t = tsub.add_parser("convert-dalle", help="convert OpenAI's encoder.pkl/decoder.pkl (needs `pip install dall-e`)")
    t.add_argument("encoder")
    t.add_argument("decoder")
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_convert)
    t = tsub.add_parser("convert-beit2", help="convert an official BEiT v2 VQ-KD tokenizer checkpoint (.pth)")
    t.add_argument("checkpoint", help="e.g. vqkd_encoder_base_decoder_1x768x12_clip-d93179da.pth")
    t.add_argument("--out", required=True)
    t.add_argument("--heads", type=int, default=0, help="attention heads (default: width / 64, the released ViT-B: 12)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer.safetensors in --out")
    t.set_defaults(func=cmd_convert_beit2)
