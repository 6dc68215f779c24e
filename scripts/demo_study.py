"""The demo's margins over seeds and budgets (issue 25): ``beit demo --minutes M --seed S`` for every pair,
one after the other (a finished pair is read, not rerun, so the study continues after a stop), then one table
of the means and spreads against the demo's targets:

- fine-tuning from the pretrained backbone >= the raw-pixel k-NN on the same labels + 5 and >= scratch + 5;
- linear and k-NN probes >= their raw-pixel versions + 2;
- segmentation above its own scratch run and the constant prediction (where the summary has them).

    python scripts/demo_study.py --out /work/exp/demo_study --minutes 5,10 --seeds 0,1,2
    python scripts/demo_study.py --out /work/exp/demo_study --minutes 5 --seeds 0,1,2 --report-only

``--minutes 5`` on the machines the results are made on stands in for the default on a machine half as fast
(docs/results.md). The machine (CPU model and ISA) is printed with the table; run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

TARGETS = (("fine-tune - pixel k-NN", 5.0), ("fine-tune - scratch", 5.0), ("linear - pixels", 2.0),
           ("k-NN - pixels", 2.0))


def margins(summary: dict) -> dict[str, float]:
    """The demo's numbers and margins from one ``summary.json``."""
    f, px, pr = summary["finetune"], summary["pixels"], summary["probe"]
    out = {"fine-tune": f["pretrained"]["top1"], "scratch": f["scratch"]["top1"], "pixel k-NN": px["knn_ft"]["top1"],
           "linear": pr["linear"]["top1"], "pixels linear": px["linear"]["top1"], "k-NN": pr["knn"]["top1"],
           "pixels k-NN": px["knn"]["top1"], "seg mIoU": summary["segment"].get("mIoU")}
    out["fine-tune - pixel k-NN"] = out["fine-tune"] - out["pixel k-NN"]
    out["fine-tune - scratch"] = out["fine-tune"] - out["scratch"]
    out["linear - pixels"] = out["linear"] - out["pixels linear"]
    out["k-NN - pixels"] = out["k-NN"] - out["pixels k-NN"]
    base = summary.get("segment_baselines") or {}  # the demo's own scratch segmenter and the constant prediction
    for k in ("scratch", "constant"):
        if (base.get(k) or {}).get("mIoU") is not None:
            out[f"seg {k} mIoU"] = base[k]["mIoU"]
    if out["seg mIoU"] is not None and "seg scratch mIoU" in out:
        out["seg - scratch"] = out["seg mIoU"] - out["seg scratch mIoU"]
    return out


def run_pair(out: Path, minutes: float, seed: int, extra: list[str]) -> Path:
    folder = out / f"m{minutes:g}_s{seed}"
    if not (folder / "summary.json").is_file():
        cmd = [sys.executable, "-m", "beit", "demo", "--out", str(folder), "--minutes", f"{minutes:g}", "--seed",
               str(seed), *extra]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=False)
    return folder / "summary.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", default="5", help="comma list")
    ap.add_argument("--seeds", default="0,1,2", help="comma list")
    ap.add_argument("--report-only", action="store_true", help="read the finished pairs, run nothing")
    ap.add_argument("extra", nargs="*", help="more `beit demo` flags, after --")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict] = {}
    for minutes in (float(m) for m in a.minutes.split(",")):
        rows = []
        for seed in (int(s) for s in a.seeds.split(",")):
            path = out / f"m{minutes:g}_s{seed}" / "summary.json" if a.report_only else run_pair(out, minutes, seed,
                                                                                                 a.extra)
            if path.is_file():
                rows.append(margins(json.loads(path.read_text())))
        if not rows:
            continue
        keys = list(rows[0])
        mean = {k: statistics.mean(r[k] for r in rows if r.get(k) is not None) for k in keys
                if any(r.get(k) is not None for r in rows)}
        spread = {k: max(r[k] for r in rows if r.get(k) is not None) - min(r[k] for r in rows if r.get(k) is not None)
                  for k in mean}
        met = {name: mean[name] >= need for name, need in TARGETS}
        table[f"{minutes:g}"] = {"runs": len(rows), "mean": mean, "spread": spread, "targets_met": met}
    machine = subprocess.run([sys.executable, "-c", "from beit import machine; print(machine.describe())"],
                             capture_output=True, text=True).stdout.strip()
    print(f"machine: {machine}")
    for minutes, t in table.items():
        print(f"\n--minutes {minutes} ({t['runs']} seeds): mean (max - min over seeds)")
        for k, v in t["mean"].items():
            print(f"  {k:24s} {v:7.2f}  ({t['spread'][k]:.2f})")
        print("  targets: " + ", ".join(f"{k} >= {need:g}: {'met' if t['targets_met'][k] else 'NOT met'}"
                                        for k, need in TARGETS))
    (out / "study.json").write_text(json.dumps({"machine": machine, "table": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
