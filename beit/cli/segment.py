"""``beit segment``: semantic segmentation on the backbone (:mod:`beit.tasks.segment`)."""

from __future__ import annotations

import argparse

from .. import recipes
from .common import add_train_flags
from .finetune import train_task


def cmd_segment(args: argparse.Namespace) -> int:
    from ..tasks import segment

    return train_task(segment, args, {"head": "head.kind", "num_classes": "data.num_classes"}, "segment")


def add_commands(sub) -> None:
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
    add_train_flags(p, sorted(recipes.SEGMENT))
    p.set_defaults(func=cmd_segment)
