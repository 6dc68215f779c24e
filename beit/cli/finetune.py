"""``beit finetune``: image classification fine-tuning (:mod:`beit.tasks.finetune`)."""

from __future__ import annotations

import argparse

from .. import recipes
from .common import add_train_flags, overrides, print_config, print_result, run_options, with_paths


def default_preset(args: argparse.Namespace) -> str | None:
    """Without --preset or --config: the CPU-sized recipe of the downstream tasks."""
    return args.preset or (None if args.config else "beit_tiny_patch4_32")


def train_task(task, args: argparse.Namespace, flags: dict[str, str], kind: str | None = None) -> int:
    """finetune / segment: config from preset + flags, paths from --init/--data, then the task's run; ``kind``
    (default: the command's name) words the summary."""
    cfg = task.build_config(default_preset(args), args.config, overrides(args, flags))
    cfg = with_paths(cfg, args.init, args.data)
    if print_config(args, cfg):
        return 0
    print_result(args, task.run(cfg, args.out, **run_options(args)), kind or args.command, args.data)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..tasks import finetune

    return train_task(finetune, args, {"labels_per_class": "data.labels_per_class",
                                       "label_fraction": "data.label_fraction"}, "finetune")


def add_commands(sub) -> None:
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
    add_train_flags(p, sorted(recipes.FINETUNE))
    p.set_defaults(func=cmd_finetune)
