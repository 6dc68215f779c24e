"""``beit export``: write a checkpoint in HF transformers or timm format (:mod:`beit.interop`)."""

from __future__ import annotations

import argparse

from .common import emit


def cmd_export(args: argparse.Namespace) -> int:
    from .. import api, interop

    interop.check_export_target(args.out, args.overwrite)  # before the (slow) load
    model = api.load(args.checkpoint, which=args.which)
    out = interop.export(model, args.out, args.format, overwrite=args.overwrite)
    emit(args, {"format": args.format, "out": str(out)}, f"{args.format} export written to {out}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint in HF transformers or timm format")
    p.add_argument("checkpoint", help="anything `beit.load` reads (run dir, HF dir, timm/official file)")
    p.add_argument("--format", required=True, choices=["hf", "timm"])
    p.add_argument("--out", required=True, help="output directory (new or empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that holds other files (replacing config.json, model.safetensors)")
    p.add_argument("--which", choices=["student", "teacher"], help="iBOT runs: which weights (default teacher)")
    p.set_defaults(func=cmd_export)
