"""``beit demo``: the whole pipeline on the shipped images, with an HTML report (:mod:`beit.demo`), each step
run through the CLI's runner (``args.run_command``, set by :func:`beit.cli.build_parser`)."""

from __future__ import annotations

import argparse
import json
import sys

from .. import recipes


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo, summary_rows, summary_text, verdict

    report, summary = run_demo(args.out, args.minutes, run_command=args.run_command, full_model=args.full_model,
                               seed=args.seed, method=args.method)
    if args.json:
        print(json.dumps({"report": str(report), **summary}))
    else:
        print(verdict(summary))
        print(summary_text(summary_rows(summary), summary["total_seconds"]))
        print(f"report: {report}")
    failed = [s["name"] for s in summary["stages"] if s["error"]]
    if failed:
        print(f"failed steps: {', '.join(failed)} (see the report)", file=sys.stderr if args.json else sys.stdout)
        return 1
    return 0


def add_commands(sub) -> None:
    DEFAULT_METHOD, METHODS = recipes.DEMO_DEFAULT_METHOD, recipes.DEMO_METHODS  # noqa: N806 - constants
    p = sub.add_parser(
        "demo", help="the whole pipeline on the shipped Fashion-MNIST images, with an HTML report",
        description="MAE pretraining (or, with --method beit, tokenizer -> BEiT pretraining) -> fine-tuning "
                    "(pretrained vs scratch) -> probes -> raw-pixel baselines -> segmentation -> attention and "
                    "masked-prediction pictures, on images shipped with beit, "
                    "within a time budget. Writes OUT/report.html with every number, picture and the "
                    "commands to run each step on your own images. Example: beit demo --out runs/demo --minutes 10")
    p.add_argument("--out", default="runs/demo", help="output folder (data, runs, report.html; default runs/demo)")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="time budget on this machine (default 10); below 1: a smoke test with tiny subsets")
    p.add_argument("--full-model", action="store_true",
                   help="train the preset's full ViT (192 x 6) instead of the demo's 96 x 4")
    p.add_argument("--method", choices=list(METHODS), default=DEFAULT_METHOD,
                   help=f"pretraining method (default {DEFAULT_METHOD}: better than beit at this scale, "
                        "docs/results.md); beit first trains the tokenizer")
    p.add_argument("--seed", type=int, default=0, help="seed of every step")
    p.set_defaults(func=cmd_demo)
