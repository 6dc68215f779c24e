"""``beit pretrain``: self-supervised pretraining with any registered method (:mod:`beit.methods`)."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from .. import recipes
from .common import add_train_flags, overrides, print_config, print_result, run_options


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ..tasks import pretrain

    ov = overrides(args, {"method": "method", "data": "data.path", "tokenizer": "tokenizer", "limit": "data.limit",
                       "probe_data": "probe.data"})
    cfg = pretrain.build_config(args.preset or default_preset(args), args.config, ov)
    if print_config(args, cfg):
        return 0
    print_result(args, pretrain.run(cfg, args.out, pictures=tracker_pictures, **run_options(args)), "pretrain",
                 args.data)
    return 0


def tracker_pictures(run: Path, image: Path, method: str) -> dict:
    """What the trackers (``--log``) also get of a finished pretraining run: attention maps of its backbone on
    ``image`` and, for MAE, its reconstructions (written into the run folder)."""
    from ..viz.attention import show_attention
    from ..viz.mae import show_mae

    out = {"attention.png": partial(show_attention, run, image, run / "attention.png")}
    if method == "mae":
        out["reconstructions.png"] = partial(show_mae, run, image, run / "reconstructions.png")
    return out


def default_preset(args: argparse.Namespace) -> str | None:
    """Without --preset or --config: the CPU-sized recipe the chosen method registered."""
    from ..methods import registry

    if args.config:
        return None
    return registry.get(args.method or "beit").default_preset or None


def add_commands(sub) -> None:
    # the built-in methods and presets from beit.recipes (no torch); a plugin method is checked when the command runs
    presets = sorted(p for method in recipes.PRETRAIN.values() for p in method)
    p = sub.add_parser("pretrain", help="self-supervised pretraining on a folder of images",
                       description="Pretrain a backbone with BEiT (visual tokens), MAE (pixels) or iBOT "
                                   "(online tokenizer). Example: beit pretrain --data imgs/ --tokenizer tok/ "
                                   "--out run/ --preset beit_tiny_patch4_32 --steps 2000")
    p.add_argument("--data", required=True, help="folder of images (any tree; labels ignored)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, loss.png)")
    p.add_argument("--tokenizer", help="tokenizer run or directory (BEiT)")
    p.add_argument("--method", metavar="NAME",
                   help=f"pretraining method: {', '.join(sorted(recipes.PRETRAIN))} (default: beit)")
    p.add_argument("--limit", type=int, help="use only the first N images (data.limit)")
    p.add_argument("--probe-data", metavar="LABELLED_DIR",
                   help="online kNN probe every train.probe_every steps on a small seeded subset of this labelled "
                        "folder (DIR/train/<class>/ + DIR/val/<class>/, or DIR/<class>/): knn_top1 in metrics.jsonl")
    add_train_flags(p, presets, check_choices=False)
    p.set_defaults(func=cmd_pretrain)
