"""``beit data``: pack an image folder into tar shards, and say what a shard set holds (:mod:`beit.data.shards`)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from tqdm import tqdm

from .common import emit


def cmd_pack(args: argparse.Namespace) -> int:
    from ..data.folder import ImageFolder, list_images
    from ..data.shards import pack

    paths = list_images(args.folder)
    root = Path(args.folder)  # labels when every image lies in a class folder (ImageNet layout)
    in_folders = bool(paths) and all(len(p.relative_to(root).parts) > 1 for p in paths)
    labelled = args.labels == "yes" or (args.labels == "auto" and in_folders)
    ds = ImageFolder(args.folder, with_labels=labelled)
    with tqdm(total=len(ds), desc="pack", unit="img", disable=args.quiet) as bar:
        shards = pack(ds, args.out, shard_size=args.shard_size, prefix=args.prefix, progress=bar.update)
    pattern = f"{args.out.rstrip('/')}/{args.prefix}-{{000000..{len(shards) - 1:06d}}}.tar"
    emit(args, {"out": args.out, "shards": len(shards), "samples": len(ds), "classes": len(ds.classes),
                "pattern": pattern},
         f"packed {len(ds)} images ({len(ds.classes)} classes) into {len(shards)} shards, verified: {args.out}\n"
         f"next: beit pretrain --data {shlex.quote(pattern)} --out runs/pretrain")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..data.folder import DataError
    from ..data.shards import TarShards, open_sharded

    ds = open_sharded(args.data)
    if ds is None:
        raise DataError(f"{args.data} is neither tar shards nor an HF datasets folder")
    info = {"kind": type(ds).__name__, "samples": len(ds), "classes": len(ds.classes)}
    if isinstance(ds, TarShards):
        info["shards"] = len(ds.shards)
    emit(args, info, "\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("data", help="pack image folders into tar shards; inspect shards",
                       description="Tar shards (WebDataset layout) for data sets too large for a folder of files: "
                                   "every training command's --data also takes 'DIR/train-{000000..000009}.tar', a "
                                   "list file, a folder of .tar, or an HF datasets folder (save_to_disk).")
    s = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    pk = s.add_parser("pack", help="write a folder of images as tar shards (labels kept), then verify them",
                      description="Example: beit data pack my_images/ --out shards/ --shard-size 1000")
    pk.add_argument("folder", help="a folder of images (class sub-folders become labels)")
    pk.add_argument("--out", required=True, help="a new or empty folder for the shards")
    pk.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    pk.add_argument("--prefix", default="train", help="shard names PREFIX-000000.tar, ... (default train)")
    pk.add_argument("--labels", choices=["auto", "yes", "no"], default="auto",
                    help="keep class folders as labels (auto: when every image is in a class folder)")
    pk.set_defaults(func=cmd_pack)
    inf = s.add_parser("info", help="samples, shards and classes of a shard set or HF datasets folder")
    inf.add_argument("data", help="shard pattern, list file, folder of .tar, or HF datasets folder")
    inf.set_defaults(func=cmd_info)
