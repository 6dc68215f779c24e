"""Where a run stands (:class:`RunState`), how it ended (:class:`TrainResult`), its length, and the error that
stops it."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import tracking
from ..config import TrainConfig


class TrainingError(RuntimeError):
    """The run cannot go on (loss NaN/inf, inconsistent resume, bad batch size); the message says why."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    status: str  # "done" | "interrupted" | "time_limit"
    last_metrics: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    best_eval: dict = field(default_factory=dict)
    # the run's open experiment trackers: :func:`finish_run` sends them the pictures, then ends them
    trackers: tracking.Trackers | None = field(default=None, repr=False, compare=False)


def resolve_steps(train: TrainConfig, n_samples: int) -> tuple[int, int]:
    """(total optimiser steps, steps per epoch) from ``train.steps`` or ``train.epochs``."""
    steps_per_epoch = n_samples // train.batch_size
    if steps_per_epoch == 0:
        raise TrainingError(
            f"the dataset has {n_samples} samples, fewer than one batch of {train.batch_size}: "
            "lower train.batch_size (--batch-size) or add data"
        )
    if train.steps > 0:
        return train.steps, steps_per_epoch
    if train.epochs > 0:
        return max(1, math.ceil(train.epochs * steps_per_epoch)), steps_per_epoch
    raise TrainingError("set the length of training: --steps N or --epochs N")


@dataclass
class RunState:
    """Where a run stands: what the loop advances each step, and the ``state.json`` part of a checkpoint."""

    total_steps: int
    steps_per_epoch: int
    step: int = 0
    start_step: int = 0  # the step this process started (or resumed) at
    best_value: float | None = None  # best ``best_metric`` so far (kept across resumes)
    status: str = "done"  # "done" | "interrupted" | "time_limit"
    last_metrics: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    best_eval: dict = field(default_factory=dict)
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    @property
    def end_of_epoch(self) -> bool:
        return self.step % self.steps_per_epoch == 0

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps


