"""``beit probe linear | knn``: probes of a frozen backbone, per layer (:mod:`beit.tasks.probe`)."""

from __future__ import annotations

import argparse
import shlex

from .common import emit, overrides, print_config, with_paths
from .summary import table


def cmd_probe(args: argparse.Namespace) -> int:
    from ..tasks import probe

    flags = {"layers": "layers", "pool": "pool", "labels_per_class": "data.labels_per_class",
             "label_fraction": "data.label_fraction", "k": "k", "steps": "steps", "seed": "seed",
             "device": "device", "batch_size": "batch_size", "img_size": "img_size", "workers": "num_workers"}
    # the probe's own keys replace the training shorthands of the same flags
    ov = [f"protocol={args.protocol}", *overrides(args, flags)]
    cfg = with_paths(probe.build_config(args.config, ov), args.init, args.data)
    if print_config(args, cfg):
        return 0
    result = probe.run(cfg, args.out)
    result.pop("config", None)
    emit(args, result, probe_summary(result, args))
    return 0


def probe_summary(res: dict, args: argparse.Namespace) -> str:
    """The chosen block and pooling with its validation accuracy, its baselines, the other pairs in brief."""
    b = res["best"]
    rows = [(f"{res['protocol']} probe, block {b['layer']}, {b['pool']} pooling", f"val top-1 {b['top1']:.2f} %"
             + (f", top-5 {b['top5']:.2f} %" if "top5" in b else ""))]
    rows.append(("chance (1 / classes)", f"{100.0 / res['num_classes']:.2f} % ({res['num_classes']} classes)"))
    if res["init"] != "pixels":
        rows.append(("raw pixels (same probe)", f"beit probe {res['protocol']} --data {shlex.quote(args.data)} "
                                                "--init pixels"))
    lines = [f"probe {res['protocol']} of {res['init']}: {res['num_train']} training / {res['num_val']} validation "
             f"images; block and pooling chosen on {res['selected_on']}", table(rows)]
    others = sorted(res["per_layer"], key=lambda r: -r["top1"])
    if len(others) > 1:
        lines.append("per block and pooling (val top-1 %): " + ", ".join(
            f"{r['layer']}/{r['pool']} {r['top1']:.1f}" for r in others[:8]) + (" ..." if len(others) > 8 else ""))
    if args.out:
        lines.append(f"files: {args.out} (every number)")
    lines.append(f"next: beit finetune --data {shlex.quote(args.data)} --init {shlex.quote(res['init'])} --out runs/ft")
    return "\n".join(lines)


def add_commands(sub) -> None:
    p = sub.add_parser(
        "probe", help="linear or k-NN probe of a frozen backbone, per layer",
        description="Extract features once per block and pooling, then fit a linear classifier "
                    "(BatchNorm + Linear) or run a weighted k-NN (k=20, T=0.07). The block and pooling are chosen on a "
                    "held-out fifth of the training labels (select_fraction=0.2), never on the validation set "
                    "reported. "
                    "Example: beit probe knn --data cifar/ --init runs/pretrain --layers all")
    p.add_argument("protocol", choices=["linear", "knn"])
    p.add_argument("--data", required=True, help="folder with train/<class>/ and val/<class>/")
    p.add_argument("--init", required=True,
                   help="backbone (anything `beit.load` reads); 'pixels': the raw pixels; 'random:CKPT': CKPT's "
                        "architecture with random weights (the no-pretraining control)")
    p.add_argument("--layers", help="'all' (default) or comma-separated 0-based block indices, e.g. 5,-1")
    p.add_argument("--pool",
                   help="token pooling: mean of the patch tokens (default), cls, grid (patch tokens pooled to "
                        "grid x grid cells, grid=4), tokens (every patch token, nothing pooled: for small models), "
                        "both (mean and cls), all (mean, cls and grid), or a comma list, e.g. all,tokens")
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
    p.add_argument("--print-config", action="store_true", help="print the resolved probe config as YAML and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. temperature=0.1")
    p.set_defaults(func=cmd_probe)
