"""``beit tokenizer train | eval | convert-dalle``: the visual tokenizer (:mod:`beit.tokenizers`)."""

from __future__ import annotations

import argparse
import json

from .common import add_train_flags, overrides, run_options


def cmd_train(args: argparse.Namespace) -> int:
    from ..tokenizers import train_tokenizer

    ov = overrides(args, {"limit": "data.limit", "val_data": "data.val_path"})
    preset = args.preset or (None if args.config else "vq_32")
    res = train_tokenizer(args.data, args.out, preset=preset, config=args.config, overrides=ov,
                          **run_options(args))
    print(json.dumps(res if isinstance(res, dict) else {"run": str(res)}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..tokenizers import evaluate_cmd

    res = evaluate_cmd(args.tokenizer, args.data, limit=args.limit or 0, grid=args.grid, batch_size=args.batch_size)
    print(json.dumps(res))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ..tokenizers import convert_dalle

    out = convert_dalle(args.encoder, args.decoder, args.out)
    print(json.dumps({"tokenizer": str(out)}))
    return 0


def add_commands(sub) -> None:
    from ..tokenizers.train import RUN_PRESETS

    tok = sub.add_parser("tokenizer", help="train, evaluate or convert a visual tokenizer (dVAE)")
    tsub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = tsub.add_parser("train", help="train a discrete VAE on a folder of images")
    t.add_argument("--data", required=True, help="folder of images")
    t.add_argument("--out", required=True, help="run directory: tokenizer.safetensors, metrics, reconstructions.png")
    t.add_argument("--limit", type=int, help="use only the first N images (data.limit)")
    t.add_argument("--val-data", help="held-out folder evaluated each epoch and at the end (data.val_path)")
    add_train_flags(t, sorted(RUN_PRESETS))
    t.set_defaults(func=cmd_train)
    t = tsub.add_parser("eval", help="PSNR and codebook usage on a held-out folder (JSON)")
    t.add_argument("--tokenizer", required=True, help="tokenizer run or directory")
    t.add_argument("--data", required=True, help="folder of images")
    t.add_argument("--limit", type=int, help="use only the first N images")
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--grid", help="also write a PNG of originals above reconstructions here")
    t.set_defaults(func=cmd_eval)
    t = tsub.add_parser("convert-dalle", help="convert OpenAI's encoder.pkl/decoder.pkl (needs `pip install dall-e`)")
    t.add_argument("encoder")
    t.add_argument("decoder")
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_convert)
