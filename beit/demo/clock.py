"""The demo's clock: how the time budget becomes each stage's steps. Every stage gets its share of the time left
among the stages still to run (so an overrun is absorbed), a timing run of the stage's own command measures
this machine's pace, and the learning stages are raised to the steps that pay (:mod:`.plan` says how many and
why). :class:`beit.demo.run.Demo` asks it before each stage.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..viz.curves import read_metrics
from .plan import CALIBRATION_STEPS, CALIBRATION_WARMUP, NO_TOKENIZER_TO_FINETUNE, SHARES, Plan, StageResult


def _rows(metrics: Path) -> list[dict]:
    return read_metrics(metrics)


def _step_seconds(run_dir: Path, batch: int, wall: float, warmup: int = CALIBRATION_WARMUP) -> float:
    """Seconds per optimiser step from a run's metrics: the median over the logged rows after the first
    ``warmup`` (start-up and the first slow steps), the whole wall clock over the steps without them."""
    rows = [r for r in _rows(run_dir / "metrics.jsonl") if r.get("images_per_s", 0) > 0]
    later = sorted(batch / r["images_per_s"] for r in rows[warmup:])
    if later:
        return later[len(later) // 2]
    return wall / CALIBRATION_STEPS


class Clock:
    """The deadline, the stages' shares and the timing runs (``run_command`` runs a ``beit`` command line;
    the timing runs' folders go under ``calib``)."""

    def __init__(self, deadline: float, method: str, plan: Plan, calib: Path, run_command: Callable[[list[str]], Any]):
        self.deadline, self.method, self.plan, self.calib, self.run_command = deadline, method, plan, calib, run_command
        # a method without a tokenizer splits the tokenizer's share between pretraining and the two fine-tunings
        self.shares = dict(SHARES)
        if method != "beit":
            freed = self.shares.pop("tokenizer")
            self.shares["pretrain"] += freed - 2 * NO_TOKENIZER_TO_FINETUNE
            self.shares["finetune_pretrained"] += NO_TOKENIZER_TO_FINETUNE
            self.shares["finetune_scratch"] += NO_TOKENIZER_TO_FINETUNE
        self._limit_s = 0.0

    def budget(self, stage: str) -> float:
        """Seconds for ``stage``: its share of the time left among the stages still to run."""
        names = list(self.shares)
        rest = names[names.index(stage):]
        left = max(self.deadline - time.perf_counter(), 0.0)
        return left * self.shares[stage] / sum(self.shares[n] for n in rest)

    def steps_for(self, stage: StageResult, budget: float, calib_argv_fn, batch: int,
                  eval_images: int = 0, n_evals: int = 0, min_steps: int = 5, wanted: tuple[int, float, float] | None = None) -> int:
        """Steps that fit ``budget`` seconds, from a 3-step timing run of the same command (``calib_argv_fn``)
        on the few images of the calibration folders. ``wanted = (steps, most, share)``: raise the budget to
        what ``steps`` take at the measured pace, up to ``most`` seconds (``share`` of the time left)."""
        self._limit_s = budget
        if self.plan.smoke:
            return 2
        run_dir = self.calib / stage.name
        shutil.rmtree(run_dir, ignore_errors=True)
        t = time.perf_counter()
        self.run_command(calib_argv_fn(run_dir))
        wall = time.perf_counter() - t
        step_s = _step_seconds(run_dir, batch, wall)
        fixed = max(wall - CALIBRATION_STEPS * step_s, 0.0)  # start-up, small evaluation, pictures
        shutil.rmtree(run_dir, ignore_errors=True)
        how = "timing run"
        if wanted is not None:
            need = wall + fixed + wanted[0] * step_s
            if need > budget:
                raised = min(need, max(wanted[1], budget))
                stage.notes.append(f"its share ({budget:.0f} s) fits {max(int((budget - wall - fixed) / step_s), 0):,} "
                                   f"steps at this machine's pace, ~{wanted[0]:,} are wanted: given {raised:.0f} s "
                                   f"(at most {wanted[2]:.0%} of the time left), taken from the later stages")
                budget = raised
        eval_s = n_evals * eval_images * step_s / batch / 3  # a forward pass is about a third of a step
        steps = int((budget - wall - fixed - eval_s) / step_s)
        self._limit_s = max(budget - wall, 0.0)
        stage.notes.append(f"{how}: {step_s:.2f} s per step of {batch} images, {fixed:.0f} s start-up; "
                           f"budget {budget:.0f} s")
        stage.planned_step_s = step_s
        return max(min_steps, steps)

    def wanted(self, steps: dict[str, int], share: float) -> tuple[int, float, float] | None:
        """``(steps, most seconds, share)`` for :meth:`steps_for` where the plan has a measured step count for
        this method and model (the demo's small one), else None (the stage keeps its share)."""
        want = steps.get(self.method)
        if not want or self.plan.full_model:
            return None
        return want, share * max(self.deadline - time.perf_counter(), 0.0), share

    def check_plan(self, stage: StageResult, run_dir: Path, batch: int) -> None:
        """Note in the report when the run's own pace differs from its timing run's by more than 1.5x
        (a busy machine during the timing run gives a stage fewer steps than its budget allows)."""
        if not stage.planned_step_s or not (run_dir / "metrics.jsonl").exists():
            return
        real = _step_seconds(run_dir, batch, 0.0, warmup=1)
        ratio = stage.planned_step_s / real if real > 0 else 1.0
        if ratio > 1.5:
            stage.notes.append(f"the timing run predicted {stage.planned_step_s:.2f} s per step, the run took "
                               f"{real:.2f}: it got ~{ratio:.1f}x fewer steps than its budget allowed (was the "
                               "machine busy?)")
        elif ratio < 1 / 1.5:
            stage.notes.append(f"the run took {real:.2f} s per step, its timing run predicted "
                               f"{stage.planned_step_s:.2f}: the wall-clock limit may have cut it short")

    def hidden(self, steps: int, time_limit: bool = True) -> list[str]:
        """Flags the demo adds to a training command and does not show: a log row every ~1/25 of the run
        (curves), and a wall-clock stop at 1.5x the stage's budget in case the machine slows down mid-run.
        Tasks get no stop: a task stopped before its evaluation would have no number to report (and
        fine-tuning augments on the CPU, so its timing run is what sizes it)."""
        h = [f"train.log_every={max(1, steps // 25)}"]
        if time_limit and not self.plan.smoke:
            h = ["--max-minutes", f"{max(1.5 * self._limit_s / 60, 0.2):.2f}", *h]
        return h


__all__ = ["Clock"]
