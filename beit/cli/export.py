"""``beit export``: a folder that HF transformers or timm load as they are (:mod:`beit.exporting`)."""

from __future__ import annotations

import argparse

from .common import emit


def cmd_export(args: argparse.Namespace) -> int:
    from .. import exporting

    out = exporting.export(args.checkpoint, args.format, args.out, which=args.which, overwrite=args.overwrite,
                           license=args.license)
    emit(args, {"format": args.format, "out": str(out)}, f"{args.format} export written to {out}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "export", help="write a checkpoint in HF transformers or timm format, with its preprocessing and model card",
        description="hf: config.json (id2label from the run's classes) + model.safetensors + preprocessor_config.json "
                    "(AutoImageProcessor, pipeline) + README.md (model card). timm: config.json (pretrained_cfg: size, "
                    "crop, mean/std, label names) + model.safetensors + README.md; load it with "
                    "timm.create_model('local-dir:OUT', pretrained=True).")
    p.add_argument("checkpoint", help="anything `beit.load` reads (run dir, HF dir, timm/official file)")
    p.add_argument("--format", required=True, choices=["hf", "timm"])
    p.add_argument("--out", required=True, help="output directory (new or empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that holds other files (replacing config.json, model.safetensors, "
                        "preprocessor_config.json, README.md)")
    p.add_argument("--which", choices=["student", "teacher"], help="iBOT runs: which weights (default teacher)")
    p.add_argument("--license", help="licence of the weights and their training data, for the model card "
                                     "(default: unknown)")
    p.set_defaults(func=cmd_export)
