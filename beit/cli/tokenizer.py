"""``beit tokenizer train | eval | convert-dalle | convert-beit2``: the visual tokenizer (:mod:`beit.tokenizers`)."""

from __future__ import annotations

import argparse
import json

from ..config import ConfigError
from .common import add_train_flags, overrides, run_options


def cmd_train(args: argparse.Namespace) -> int:
    from ..tokenizers import train_tokenizer, train_vqkd

    ov = overrides(args, {"limit": "data.limit", "val_data": "data.val_path"})
    if args.objective == "vqkd":  # a semantic tokenizer distilled from --teacher (BEiT v2)
        preset = args.preset or (None if args.config else "vqkd_32")
        run = train_vqkd(args.data, args.out, preset=preset, config=args.config, overrides=ov, teacher=args.teacher,
                         **run_options(args))
        print(json.dumps({"run": str(run)}))
        return 0
    if args.teacher:
        raise ConfigError("--teacher is for --objective vqkd")
    if args.objective:
        ov.append(f"model.quantizer={args.objective}")
    preset = args.preset or (None if args.config else "vq_32")
    res = train_tokenizer(args.data, args.out, preset=preset, config=args.config, overrides=ov,
                          **run_options(args))
    print(json.dumps(res if isinstance(res, dict) else {"run": str(res)}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..tokenizers import evaluate_cmd

    res = evaluate_cmd(args.tokenizer, args.data, limit=args.limit or 0, grid=args.grid, batch_size=args.batch_size,
                       teacher=args.teacher)
    print(json.dumps(res))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ..tokenizers import convert_dalle

    out = convert_dalle(args.encoder, args.decoder, args.out)
    print(json.dumps({"tokenizer": str(out)}))
    return 0


def cmd_convert_beit2(args: argparse.Namespace) -> int:
    from ..tokenizers import convert_beit2

    out = convert_beit2(args.checkpoint, args.out, encoder_heads=args.heads, decoder_heads=args.heads,
                        overwrite=args.overwrite)
    print(json.dumps({"tokenizer": str(out)}))
    return 0


def add_commands(sub) -> None:
    from ..tokenizers.train import RUN_PRESETS
    from ..tokenizers.vqkd_train import VQKD_RUN_PRESETS

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
    add_train_flags(t, sorted({*RUN_PRESETS, *VQKD_RUN_PRESETS}))
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
