"""Summarise a run folder of scripts/cifar10_study.sh: one table row per initialisation (Markdown on stdout,
JSON in RUNS/summary.json): fine-tuning top-1 per recipe, best kNN / linear probe layer, last online kNN."""
from __future__ import annotations

import json
from pathlib import Path


def last(rows: list[dict], key: str):
    vals = [r[key] for r in rows if key in r]
    return vals[-1] if vals else None


def metrics(path: Path) -> list[dict]:
    f = path / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


def main(runs: Path) -> dict:
    names = sorted({p.name.split("_", 2)[-1] for p in runs.glob("ft_r*_*") if p.is_dir()} |
                   {p.stem.split("_", 2)[-1] for p in runs.glob("probe_*.json")} |
                   {p.name[len("pre_"):] for p in runs.glob("pre_*") if p.is_dir()})
    table = {}
    for n in names:
        row = {}
        for r in ("r1", "r2", "r3"):
            row[f"ft_{r}"] = last(metrics(runs / f"ft_{r}_{n}"), "val_top1")
        for p in ("knn", "linear"):
            f = runs / f"probe_{p}_{n}.json"
            if f.is_file():
                best = json.loads(f.read_text())["best"]
                row[p] = best["top1"]
                row[f"{p}_layer"] = best["layer"]
        pre = metrics(runs / f"pre_{n}")
        row["online_knn"] = [(r["step"], r["knn_top1"]) for r in pre if "knn_top1" in r]
        row["pretrain_s"] = last(pre, "elapsed_s")
        table[n] = row
    (runs / "summary.json").write_text(json.dumps(table, indent=1) + "\n")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print("| init | fine-tune R1 | fine-tune R2 | fine-tune R3 | kNN (layer) | linear (layer) "
          "| online kNN: first -> last |")
    print("|---|---|---|---|---|---|---|")
    for n, r in table.items():
        ok = r["online_knn"]
        curve = f"{ok[0][1]:.1f} -> {ok[-1][1]:.1f} (step {ok[-1][0]})" if ok else "-"
        print(f"| {n} | {fmt(r['ft_r1'])} | {fmt(r['ft_r2'])} | {fmt(r['ft_r3'])} | {fmt(r.get('knn'))} ({r.get('knn_layer', '-')}) "
              f"| {fmt(r.get('linear'))} ({r.get('linear_layer', '-')}) | {curve} |")
    return table


# steps of each run at SCALE=1 (scripts/cifar10_study.sh): the same wall clock (about 60 minutes) on a 2-core CPU
FULL_STEPS = {"mae": 10800, "ibot": 1800}


def clock(runs: Path, name: str):
    """``step -> pretraining minutes`` of run ``pre_NAME`` by its own clock (the last logged elapsed time at or
    before the step); BEiT runs start after their tokenizer's minutes (folder ``tok``)."""
    rows = metrics(runs / f"pre_{name}")
    ticks = [(r["step"], r["elapsed_s"]) for r in rows if "elapsed_s" in r]
    offset = 0.0
    if name.startswith("beit") and (runs / "tok").is_dir():
        offset = (last(metrics(runs / "tok"), "elapsed_s") or 0.0) / 60

    def minutes(step: int) -> float:
        before = [e for s, e in ticks if s <= step]
        return offset + (before[-1] / 60 if before else 0.0)

    return minutes


def measured_minutes(runs: Path, name: str) -> list[tuple[float, float]]:
    """(minutes, online kNN) of a run by its own clock."""
    at = clock(runs, name)
    return [(at(r["step"]), r["knn_top1"]) for r in metrics(runs / f"pre_{name}") if "knn_top1" in r]


def finetune_curve(runs: Path, name: str) -> list[tuple[float, float, int]]:
    """(pretraining minutes, fine-tuned top-1, step) of run ``pre_NAME``: one point per fine-tuning of one of its
    checkpoints (folders ``ft_curve_NAME_STEP``, started from ``snaps/pre_NAME/step_STEP``) plus the end of the
    run (folder ``ft_NAME``, fine-tuned from the run itself), all with the same fine-tuning recipe."""
    at = clock(runs, name)
    pts = []
    for ft in runs.glob(f"ft_curve_{name}_*"):
        top1 = last(metrics(ft), "val_top1")
        if top1 is not None:
            step = int(ft.name.rsplit("_", 1)[1])
            pts.append((at(step), top1, step))
    end = last(metrics(runs / f"ft_{name}"), "val_top1")
    if end is not None:
        step = last(metrics(runs / f"pre_{name}"), "step")
        pts.append((at(step), end, step))
    return sorted(pts)


def plot_finetune_curve(runs: Path, names: list[str], out: Path, scratch: float | None = None,
                        pixels_knn: float | None = None) -> Path:
    """Fine-tuned top-1 against pretraining minutes, with the from-scratch and raw-pixel lines."""
    fig, ax = _axes()
    for name in names:
        pts = finetune_curve(runs, name)
        if pts:
            ax.plot([m for m, _, _ in pts], [v for _, v, _ in pts], marker="o", lw=1.2, label=name)
            for m, v, _ in pts:
                ax.annotate(f"{v:.1f}", (m, v), textcoords="offset points", xytext=(0, 5), fontsize=7, ha="center")
    if scratch is not None:
        ax.axhline(scratch, color="tab:gray", ls="-.", lw=1, label="from scratch (same fine-tuning)")
    if pixels_knn is not None:
        ax.axhline(pixels_knn, color="k", ls="--", lw=1, label="raw-pixel kNN")
    return _save(fig, ax, out, "pretraining minutes, one thread (BEiT: including its tokenizer's)",
                 "fine-tuned test top-1 (%)")


def _axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 3.6))


def _save(fig, ax, out: Path, xlabel: str, ylabel: str, ncol: int = 1) -> Path:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=ncol)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot(table: dict, out: Path, pixels_knn: float | None = None, runs: Path | None = None) -> Path:
    """Online kNN top-1 against the pretraining budget: minutes by each run's own clock (``runs`` given, a CPU
    study), or the fraction of the study's one-hour CPU budget (a GPU study, mapped by images/s)."""
    fig, ax = _axes()
    for name, row in table.items():
        if runs is not None:
            pts = measured_minutes(runs, name)
        else:
            full = FULL_STEPS.get(name, 6000)
            pts = [(60 * s / full, v) for s, v in row["online_knn"]]
        if pts:
            ax.plot([m for m, _ in pts], [v for _, v in pts], marker=".", lw=1.2, label=name)
    if pixels_knn is not None:
        ax.axhline(pixels_knn, color="k", ls="--", lw=1, label="raw pixels")
    return _save(fig, ax, out, "pretraining minutes (BEiT: after its tokenizer's)" if runs is not None else
                 "pretraining budget (minutes of the 2-core CPU, by measured images/s)", "online kNN top-1 (%)", ncol=2)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs", type=Path)
    ap.add_argument("plot", type=Path, nargs="?", help="write the online-kNN curve here")
    ap.add_argument("pixels_knn", type=float, nargs="?", help="the raw-pixel line on the plot")
    ap.add_argument("--measured", action="store_true", help="x axis: each run's own minutes (a CPU study)")
    ap.add_argument("--finetune-curve", nargs="+", metavar="NAME",
                    help="instead: fine-tuned top-1 against pretraining minutes of these runs (ft_curve_NAME_STEP "
                         "folders and ft_NAME), plotted to PLOT with the raw-pixel line at PIXELS_KNN")
    ap.add_argument("--scratch", type=float, help="the from-scratch line of --finetune-curve")
    a = ap.parse_args()
    if a.finetune_curve:
        for n in a.finetune_curve:
            for m, v, s in finetune_curve(a.runs, n):
                print(f"| {n} | {s} | {m:.1f} | {v:.2f} |")
        if a.plot:
            plot_finetune_curve(a.runs, a.finetune_curve, a.plot, a.scratch, a.pixels_knn)
        raise SystemExit(0)
    tbl = main(a.runs)
    if a.plot:
        plot(tbl, a.plot, a.pixels_knn, a.runs if a.measured else None)
