"""The short human summary each command ends with: a small table, where the files are, the next command.

``--json`` replaces it with one machine-readable line (:func:`beit.cli.common.emit`); this module only words.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

__all__ = ["table", "training_summary"]


def table(rows: list[tuple[str, str]], header: tuple[str, str] | None = None) -> str:
    """Two aligned columns (``name  value``), with an optional header row."""
    rows = [header, *rows] if header else rows
    width = max((len(r[0]) for r in rows), default=0)
    return "\n".join(f"  {a:<{width}}  {b}".rstrip() for a, b in rows)


def _num_classes(run: Path) -> int | None:
    classes = run / "classes.txt"
    if classes.is_file():
        return len([ln for ln in classes.read_text().splitlines() if ln.strip()])
    return None


def _pct(v: float) -> str:
    return f"{v:.2f} %"


def training_summary(res, kind: str, data: str | None = None) -> str:
    """What a finished training run (:class:`beit.engine.TrainResult`) gives the user, in a few lines."""
    run = Path(res.run_dir)
    q = shlex.quote
    lines = [f"{kind}: {res.status} at step {res.step} -> {run}"]
    rows: list[tuple[str, str]] = []
    best, last = res.best_eval or {}, res.last_eval or {}
    if "top1" in best:
        rows.append(("val top-1 (best)", f"{_pct(best['top1'])} at step {best.get('step', '?')}"))
        if "top1" in last:
            rows.append(("val top-1 (last)", _pct(last["top1"])))
        if (c := _num_classes(run)) is not None:
            rows.append(("chance (1 / classes)", f"{_pct(100.0 / c)} ({c} classes)"))
    if "mIoU" in best:
        rows.append(("val mIoU (best)", f"{best['mIoU']:.2f} at step {best.get('step', '?')}"))
        if "pixel_acc" in best:
            rows.append(("val pixel accuracy", _pct(best["pixel_acc"])))
    for key, label in (("psnr", "val PSNR (dB)"), ("usage", "codebook in use")):
        if key in last:
            rows.append((label, f"{last[key]:.4g}"))
    m = res.last_metrics or {}
    for key, label in (("loss", "training loss (last window)"), ("mlm_acc", "masked-token accuracy (training)")):
        if key in m:
            rows.append((label, f"{m[key]:.4g}"))
    if rows:
        lines.append(table(rows))
    files = [p for p in ("checkpoints/best", "tokenizer.safetensors", "metrics.jsonl", "loss.png", "curves.png",
                         "reconstructions.png", "predictions.png", "eval.json") if (run / p).exists()]
    lines.append("files: " + ", ".join(str(run / p) for p in files))
    if (run / "trackers.json").is_file():
        names = ", ".join(json.loads((run / "trackers.json").read_text()))
        lines.append(f"trackers: {names} (see `beit {kind} --help`, --log)")
    d = q(data) if data else "DATA"
    nxt = {
        "tokenizer": f"beit pretrain --method beit --data {d} --tokenizer {q(str(run))} --out runs/pretrain",
        "pretrain": f"beit probe knn --data LABELLED_DIR --init {q(str(run))}   (then: beit finetune --init "
                    f"{q(str(run))} ...)",
        "finetune": f"beit export {q(str(run))} --format hf --out export/{run.name}",
        "segment": f"beit show attention --init {q(str(run))} --image IMAGE --out attention.png",
    }.get(kind)
    if res.status != "done":
        nxt = f"the same command with --resume (stopped: {res.status})"
    if nxt:
        lines.append(f"next: {nxt}")
    return "\n".join(lines)
