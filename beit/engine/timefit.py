"""A run's length fitted to its minutes (``train.fit_to_time`` with ``--max-minutes``).

``--max-minutes`` alone stops a run when its time is up, wherever its learning-rate schedule stands: a run
given far more steps than its minutes allow is cut in warmup or at peak learning rate, and its result says
little about the method. With ``train.fit_to_time=true`` the engine times the first steady steps (after
``train.compile=auto`` has decided and the first compiled step, which holds the compile time), then shortens
the run to the steps that fit the minutes left at that pace, less a margin for the probes, evaluations and
checkpoints it will still write; warmup and decay are then laid out over that length and complete. It only
ever shortens (never past ``--steps``), decides once, and records the decision in ``metrics.jsonl``; the
fitted length is saved in every checkpoint and a resumed run keeps it.
"""

from __future__ import annotations

import math

PACE_STEPS = 20  # steady steps timed before the fit
MARGIN = 0.05  # share of the minutes left kept for what is not an optimiser step (probes, evals, saves)


def fitted_total(step: int, total: int, step_times: list[float], left_s: float, margin: float = MARGIN) -> int:
    """The run's new length: ``step`` plus the steps of the mean timed pace that fit ``left_s`` seconds less
    ``margin`` of them, at most ``total`` and at least ``step + 1``."""
    if not step_times:
        return total
    pace = sum(step_times) / len(step_times)
    return max(step + 1, min(total, step + math.floor(max(0.0, left_s) * (1.0 - margin) / max(pace, 1e-9))))


def ready(step_times: list[float]) -> bool:
    """Enough steady steps timed to fit on (a count, not seconds: every process fits at the same step)."""
    return len(step_times) >= PACE_STEPS
