"""Training curves from ``metrics.jsonl`` (one PNG, one panel per metric)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

log = logging.getLogger("beit")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def run_curves(run_dir: str | Path, png: str, keys: Sequence[str], title: str = "") -> Callable[[], Path | None]:
    """Draws ``run_dir/png`` from ``run_dir/metrics.jsonl`` when called (an output of ``engine.finish_run``)."""
    run_dir = Path(run_dir)
    return partial(plot_metrics, run_dir / "metrics.jsonl", run_dir / png, keys=tuple(keys), title=title)


def plot_metrics(metrics: str | Path, out: str | Path, keys: Sequence[str] = ("loss",), title: str = "") -> Path | None:
    """Plot the ``keys`` present in ``metrics.jsonl`` against step; train and ``val_*`` rows alike."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    present = [k for k in keys if any(k in r for r in rows)]
    if not present:
        log.warning("no %s in %s: no curve drawn", "/".join(keys), metrics)
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(3.6 * len(present), 3.0), squeeze=False)
    for ax, key in zip(axes[0], present):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
