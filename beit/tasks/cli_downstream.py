"""Command line of the downstream tasks: ``beit finetune``, ``beit probe``, ``beit segment``, ``beit show``.

Registered by :func:`beit.cli._load_extra_commands` through :func:`add_commands`. Parsing only: every
command builds its config and calls the library (:mod:`.finetune`, :mod:`.probe`, :mod:`.segment`,
:mod:`beit.viz.attention`, :mod:`beit.viz.mim`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from .. import cli


def _with_paths(cfg, init: str | None, data: str | None):
    """Paths are set as given (never YAML-parsed: a folder named ``1e3`` or ``true`` stays a string)."""
    changes = {}
    if init is not None:
        changes["init"] = init
    if data is not None:
        changes["data"] = dataclasses.replace(cfg.data, path=data)
    return dataclasses.replace(cfg, **changes)


def _default_preset(args: argparse.Namespace) -> str | None:
    return args.preset or (None if args.config else "beit_tiny_patch4_32")


# --------------------------------------------------------------------------------------------- commands


def _train_task(task, args: argparse.Namespace, flags: dict[str, str]) -> int:
    """finetune / segment: config from preset + flags, paths from --init/--data, then the task's run."""
    cfg = task.build_config(_default_preset(args), args.config, cli._overrides(args, flags))
    cfg = _with_paths(cfg, args.init, args.data)
    res = task.run(cfg, args.out, resume=args.resume, max_minutes=args.max_minutes)
    cli._print_result(res)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from . import finetune

    return _train_task(finetune, args, {"labels_per_class": "data.labels_per_class",
                                        "label_fraction": "data.label_fraction"})


def cmd_probe(args: argparse.Namespace) -> int:
    from . import probe

    flags = {"layers": "layers", "pool": "pool", "labels_per_class": "data.labels_per_class",
             "label_fraction": "data.label_fraction", "k": "k", "steps": "steps", "seed": "seed",
             "device": "device", "batch_size": "batch_size", "img_size": "img_size", "workers": "num_workers"}
    # the probe's own keys replace the training shorthands of the same flags
    ov = [f"protocol={args.protocol}", *cli._overrides(args, flags)]
    cfg = _with_paths(probe.build_config(args.config, ov), args.init, args.data)
    result = probe.run(cfg, args.out)
    result.pop("config", None)
    print(json.dumps(result))
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from . import segment

    return _train_task(segment, args, {"head": "head.kind", "num_classes": "data.num_classes"})


def cmd_show_attention(args: argparse.Namespace) -> int:
    from ..viz.attention import show_attention

    out = show_attention(args.init, args.image, args.out, layer=args.layer)
    print(json.dumps({"out": str(out), "layer": args.layer}))
    return 0


def cmd_show_mim(args: argparse.Namespace) -> int:
    from ..viz.mim import show_mim

    print(json.dumps(show_mim(args.init, args.tokenizer, args.image, args.out, seed=args.seed)))
    return 0


def cmd_show_mae(args: argparse.Namespace) -> int:
    from ..viz.mae import show_mae

    out = show_mae(args.init, args.image, args.out, seed=args.seed)
    print(json.dumps({"out": str(out)}))
    return 0


# --------------------------------------------------------------------------------------------- parsers


def add_commands(sub) -> None:
    from . import finetune, segment

    cli.COMMAND_PRESETS.setdefault("fine-tuning", lambda: list(finetune.PRESETS))
    cli.COMMAND_PRESETS.setdefault("segmentation", lambda: list(segment.PRESETS))

    p = sub.add_parser(
        "finetune", help="fine-tune a classifier on DIR/train/<class>/, evaluated on DIR/val/<class>/",
        description="Fine-tune with the BEiT recipe (layer decay, mean pooling, Mixup/CutMix, RandAugment). "
                    "Example: beit finetune --data cifar/ --init runs/pretrain --out runs/ft "
                    "--preset beit_tiny_patch4_32 --epochs 50")
    p.add_argument("--data", required=True, help="folder with train/<class>/ and val/<class>/")
    p.add_argument("--init", required=True, metavar="CKPT|none",
                   help="backbone to start from (run dir, HF folder, timm/official file) or 'none' (scratch)")
    p.add_argument("--out", required=True, help="run directory (checkpoints incl. best, metrics.jsonl, curves.png)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--labels-per-class", type=int, help="train on N images per class (balanced, seeded)")
    g.add_argument("--label-fraction", type=float, help="train on this fraction of each class")
    cli._add_train_flags(p, sorted(finetune.PRESETS))
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "probe", help="linear or k-NN probe of a frozen backbone, per layer (JSON)",
        description="Extract features once per block and pooling, then fit a linear classifier "
                    "(BatchNorm + Linear) or run a weighted k-NN (k=20, T=0.07). "
                    "Example: beit probe knn --data cifar/ --init runs/pretrain --layers all")
    p.add_argument("protocol", choices=["linear", "knn"])
    p.add_argument("--data", required=True, help="folder with train/<class>/ and val/<class>/")
    p.add_argument("--init", required=True, help="backbone (anything `beit.load` reads)")
    p.add_argument("--layers", help="'all' (default) or comma-separated 0-based block indices, e.g. 5,-1")
    p.add_argument("--pool", choices=["mean", "cls", "both"], help="token pooling (default mean)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--labels-per-class", type=int, help="use N training images per class (balanced, seeded)")
    g.add_argument("--label-fraction", type=float, help="use this fraction of each class")
    p.add_argument("--k", type=int, help="k-NN: neighbours (default 20)")
    p.add_argument("--steps", type=int, help="linear: optimiser steps (default 500)")
    p.add_argument("--batch-size", type=int, help="feature extraction batch (default 128)")
    p.add_argument("--img-size", type=int, help="input resolution (default: the checkpoint's)")
    p.add_argument("--workers", type=int, help="data loading processes (default 2)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--config", metavar="YAML", help="probe config file")
    p.add_argument("--out", help="also write the JSON result to this file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. temperature=0.1")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser(
        "segment", help="semantic segmentation: UperNet (or SETR-PUP) head on the backbone",
        description="Train a segmenter on DIR/images/{train,val}/ + DIR/masks/{train,val}/ (PNG label maps, "
                    "255 = ignore); reports mIoU. Example: beit segment --data seg/ --init runs/pretrain "
                    "--out runs/seg --steps 2000")
    p.add_argument("--data", required=True, help="folder with images/{train,val}/ and masks/{train,val}/")
    p.add_argument("--init", required=True, metavar="CKPT|none", help="backbone to start from, or 'none'")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, predictions.png)")
    p.add_argument("--head", choices=["upernet", "pup"], help="decoder head (default upernet)")
    p.add_argument("--num-classes", type=int, help="classes (default: 1 + largest label in the train masks)")
    cli._add_train_flags(p, sorted(segment.PRESETS))
    p.set_defaults(func=cmd_segment)

    show = sub.add_parser("show", help="pictures: attention maps, masked-image-modeling predictions")
    ssub = show.add_subparsers(dest="show_command", metavar="WHAT", required=True)
    s = ssub.add_parser("attention", help="[CLS] attention to every patch, per head and mean, over the image")
    s.add_argument("--init", required=True, help="model (anything `beit.load` reads)")
    s.add_argument("--image", required=True)
    s.add_argument("--out", required=True, help="PNG to write")
    s.add_argument("--layer", type=int, default=-1, help="block index, negative from the end (default -1)")
    s.set_defaults(func=cmd_show_attention)
    s = ssub.add_parser("mim", help="blockwise mask, tokenizer decode of predicted vs true visual tokens")
    s.add_argument("--init", required=True, help="BEiT pretraining run (or model with an MIM head)")
    s.add_argument("--tokenizer", required=True, help="tokenizer run or tokenizer.safetensors")
    s.add_argument("--image", required=True)
    s.add_argument("--out", required=True, help="PNG to write")
    s.add_argument("--seed", type=int, default=0, help="seed of the mask")
    s.set_defaults(func=cmd_show_mim)
    s = ssub.add_parser("mae", help="MAE: original, masked, reconstruction, reconstruction + visible patches")
    s.add_argument("--init", required=True, help="MAE pretraining run")
    s.add_argument("--image", required=True)
    s.add_argument("--out", required=True, help="PNG to write")
    s.add_argument("--seed", type=int, default=0, help="seed of the mask")
    s.set_defaults(func=cmd_show_mae)
