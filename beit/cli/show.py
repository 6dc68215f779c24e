"""``beit show attention | mim | mae``: pictures of a model (:mod:`beit.viz`)."""

from __future__ import annotations

import argparse

from .common import emit


def cmd_attention(args: argparse.Namespace) -> int:
    from ..config import normalize_img_size
    from ..viz.attention import show_attention

    size = None if args.img_size is None else normalize_img_size(args.img_size, "--img-size")
    out = show_attention(args.init, args.image, args.out, layer=args.layer, img_size=size)
    emit(args, {"out": str(out), "layer": args.layer}, f"attention maps of block {args.layer} written to {out}")
    return 0


def cmd_mim(args: argparse.Namespace) -> int:
    from ..viz.mim import show_mim

    res = show_mim(args.init, args.tokenizer, args.image, args.out, seed=args.seed)
    emit(args, res, f"masked-image-modeling picture written to {args.out}\n" + ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items() if k != "out"))
    return 0


def cmd_mae(args: argparse.Namespace) -> int:
    from ..viz.mae import show_mae

    out = show_mae(args.init, args.image, args.out, seed=args.seed)
    emit(args, {"out": str(out)}, f"MAE reconstruction picture written to {out}")
    return 0


def add_commands(sub) -> None:
    show = sub.add_parser("show", help="pictures: attention maps, masked-image-modeling predictions")
    ssub = show.add_subparsers(dest="show_command", metavar="WHAT", required=True)
    s = ssub.add_parser("attention", help="[CLS] attention to every patch, per head and mean, over the image")
    s.add_argument("--init", required=True, help="model (anything `beit.load` reads)")
    s.add_argument("--image", required=True)
    s.add_argument("--out", required=True, help="PNG to write")
    s.add_argument("--layer", type=int, default=-1, help="block index, negative from the end (default -1)")
    s.add_argument("--img-size", metavar="S|HxW", help="run at this size, e.g. 120x160 (height x width; default: "
                   "the checkpoint's), position tables resized")
    s.set_defaults(func=cmd_attention)
    s = ssub.add_parser("mim", help="blockwise mask, tokenizer decode of predicted vs true visual tokens")
    s.add_argument("--init", required=True, help="BEiT pretraining run (or model with an MIM head)")
    s.add_argument("--tokenizer", required=True, help="tokenizer run or tokenizer.safetensors")
    s.add_argument("--image", required=True)
    s.add_argument("--out", required=True, help="PNG to write")
    s.add_argument("--seed", type=int, default=0, help="seed of the mask")
    s.set_defaults(func=cmd_mim)
    s = ssub.add_parser("mae", help="MAE: original, masked, reconstruction, reconstruction + visible patches")
    s.add_argument("--init", required=True, help="MAE pretraining run")
    s.add_argument("--image", required=True)
    s.add_argument("--out", required=True, help="PNG to write")
    s.add_argument("--seed", type=int, default=0, help="seed of the mask")
    s.set_defaults(func=cmd_mae)
