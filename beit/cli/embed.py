"""``beit embed``: pooled features of a folder of images, to ``.npy`` + a CSV index (:mod:`beit.tasks.embed`)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from .common import overrides


def cmd_embed(args: argparse.Namespace) -> int:
    from ..tasks import embed

    flags = {"layer": "layer", "pool": "pool", "grid": "grid", "batch_size": "batch_size", "device": "device",
             "img_size": "img_size", "crop_pct": "crop_pct", "workers": "num_workers"}
    # paths as given, never YAML-parsed (a folder named ``1e3`` stays a string)
    cfg = dataclasses.replace(embed.build_config(args.config, overrides(args, flags)), init=args.init, data=args.data)
    res = embed.run(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(json.dumps(res) if args.json else human_summary(res))
    return 0


def human_summary(res: dict) -> str:
    """What was written, where, and how to read it back."""
    labels = f"labels of {res['classes']} classes" if res["classes"] else "no labels (no class sub-folders)"
    return "\n".join([
        f"embedded {res['images']} images: {res['dim']} features each (block {res['layer']}, {res['pool']} pooling)",
        f"  {res['out']:<28} float32 {res['images']} x {res['dim']}",
        f"  {res['index']:<28} row, path, label, class ({labels})",
        f"read back: numpy.load({res['out']!r}, mmap_mode='r') and the CSV index row by row",
    ])


def add_commands(sub) -> None:
    p = sub.add_parser(
        "embed", help="write pooled features of a folder of images (.npy + .csv index of paths and labels)",
        description="One vector per image from a frozen backbone, with beit probe's block and pooling choices "
                    "(block before the final LayerNorm; mean, cls, grid or tokens pooling), through the model's own "
                    "resize/crop/normalisation. Example: beit embed --init runs/mae --data my_labelled/val "
                    "--out emb/val.npy")
    p.add_argument("--init", required=True, help="anything `beit.load` reads: a run, a checkpoint, an HF or timm export")
    p.add_argument("--data", required=True, help="folder of images; <class>/ sub-folders give the labels")
    p.add_argument("--out", required=True, help="FILE.npy (float32 N x D); the index is written as FILE.csv")
    p.add_argument("--layer", type=int, help="0-based block index, -1 (default) the last")
    p.add_argument("--pool", choices=["mean", "cls", "grid", "tokens"], help="token pooling (default mean)")
    p.add_argument("--grid", type=int, help="--pool grid: cells per side (default 4)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default 64)")
    p.add_argument("--device", help="auto (default) | cpu | cuda")
    p.add_argument("--img-size", type=int, help="input resolution (default: the model's)")
    p.add_argument("--crop-pct", type=float, help="resize to size / crop_pct, then centre crop (default: the model's)")
    p.add_argument("--workers", type=int, help="data loading processes (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace FILE.npy / FILE.csv if they exist")
    p.add_argument("--json", action="store_true", help="print one machine-readable JSON line instead of the summary")
    p.add_argument("--config", metavar="YAML", help="embed config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. pool=cls")
    p.set_defaults(func=cmd_embed)
