"""beit.engine.timefit: the run length that fits the minutes left, by hand."""

from __future__ import annotations

from beit.engine import timefit


def test_fitted_total_by_hand():
    # 90 s left, 0.5 s per step, 5% margin: 90 * 0.95 / 0.5 = 171 more steps
    assert timefit.fitted_total(20, 100_000, [0.4, 0.6] * 10, 90.0) == 20 + 171
    assert timefit.fitted_total(20, 100, [0.5] * 20, 90.0) == 100  # never longer than asked
    assert timefit.fitted_total(20, 100_000, [0.5] * 20, -10.0) == 21  # out of time: one more step
    assert timefit.fitted_total(20, 100_000, [], 90.0) == 100_000  # nothing timed: unchanged


def test_ready_after_a_count_of_steps():
    assert not timefit.ready([0.1] * (timefit.PACE_STEPS - 1)) and timefit.ready([0.1] * timefit.PACE_STEPS)
