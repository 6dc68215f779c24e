"""What ``torch.compile`` costs and saves for a real ``beit pretrain`` run: the figures behind
``train.compile=auto`` (:mod:`beit.compiling`).

For each method, the same short run (preset, folder, batch, seed) is made twice in this process, eager
(``train.compile=false``) and compiled (``train.compile=true``), logging every step. Reported:

- eager and compiled step time (median over the steps after the first two of each run),
- the compile cost: the compiled run's first step minus the eager run's first step,
- the speed-up and the break-even point: how many steps (and eager minutes) a run needs before compiling wins.

Every output starts with the machine (CPU model, ISA level or GPU, threads, torch).

    python bench/compile_cost.py --data /tmp/cifar/train --methods beit,mae --steps 30 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beit import machine  # noqa: E402
from beit.cli import run_command  # noqa: E402
from beit.viz.curves import read_metrics  # noqa: E402


def step_seconds(run: Path) -> list[float]:
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "step_time" in r]
    return [r["step_time"] + r.get("data_time", 0.0) for r in rows]


def one_run(argv: list[str], out: Path, compile_: bool) -> tuple[list[float], float]:
    t = time.perf_counter()
    run_command([*argv[:1], "--out", str(out), *argv[1:], f"train.compile={str(compile_).lower()}",
                 "train.log_every=1", "train.ckpt_every=100000"])
    return step_seconds(out), time.perf_counter() - t


def bench_method(method: str, args, tmp: Path) -> dict:
    argv = ["pretrain", "--data", args.data, "--method", method, "--steps", str(args.steps),
            "--batch-size", str(args.batch), "--workers", "0", "--limit", str(args.steps * args.batch)]
    if method == "beit":
        tok = tmp / "tok"
        if not tok.exists():
            run_command(["tokenizer", "train", "--data", args.data, "--out", str(tok), "--preset", "vq_32",
                         "--steps", "2", "--batch-size", str(args.batch), "--workers", "0",
                         "--limit", str(4 * args.batch)])
        argv[1:1] = ["--tokenizer", str(tok)]
    eager, eager_wall = one_run(argv, tmp / f"{method}_eager", False)
    comp, comp_wall = one_run(argv, tmp / f"{method}_compiled", True)
    e, c = statistics.median(eager[2:]), statistics.median(comp[2:])
    cost = comp[0] - eager[0]
    gain = e - c
    breakeven = cost / gain if gain > 0 else float("inf")
    return {"method": method, "batch": args.batch, "eager_step_s": round(e, 4), "compiled_step_s": round(c, 4),
            "speedup": round(e / c, 3), "compile_s": round(cost, 1),
            "breakeven_steps": None if breakeven == float("inf") else round(breakeven),
            "breakeven_eager_minutes": None if breakeven == float("inf") else round(breakeven * e / 60, 1),
            "wall_s": {"eager": round(eager_wall, 1), "compiled": round(comp_wall, 1)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a folder of images")
    ap.add_argument("--methods", default="beit,mae,ibot")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine.describe(torch.device('cpu'))}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for m in args.methods.split(","):
            row = bench_method(m, args, Path(d))
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine.describe(torch.device("cpu")), "rows": rows},
                                              indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
