"""``metrics.jsonl``: the rows a run logs (rank 0), also handed to its experiment trackers; the running means of
the step metrics between two rows."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import checkpoint as ckpt
from .. import tracking


class MetricsWriter:
    """``metrics.jsonl`` (rank 0), each row also handed to the run's experiment trackers (:mod:`beit.tracking`)."""

    def __init__(self, run_dir: Path, enabled: bool, trackers: tracking.Trackers | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.trackers = trackers

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (and a line cut short by a kill) so the file
        reads as one uninterrupted run. Replaced atomically: a kill meanwhile leaves the old file."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = []
        for ln in self.path.read_text().splitlines():
            try:
                row = json.loads(ln)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                keep.append(ln)
        ckpt.write_text_atomically(self.path, "".join(ln + "\n" for ln in keep))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.trackers is not None:
            self.trackers.log_metrics(row)


class MetricsWindow:
    """Running means of the step metrics between two log lines, and the images seen meanwhile."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}  # per metric: a skipped step (train.nonfinite=skip) adds none
        self.count = 0
        self.images = 0
        self.data_wait = 0.0  # seconds this process waited for batches
        self.t0 = time.perf_counter()

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.count += 1

    def means(self) -> dict[str, float]:
        """Mean of each metric over the steps that reported it; ``nonfinite_skipped``: skipped steps, counted."""
        return {k: v if k == "nonfinite_skipped" else v / self.counts[k] for k, v in self.sums.items()}


