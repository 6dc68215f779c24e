"""beit.engine.timefit: the run length that fits the minutes left, by hand."""

from __future__ import annotations

from beit.engine import timefit


def test_fitted_total_by_hand():
    # 2 minutes, 30 s gone, 0.5 s per step, 5% margin: (120 - 30) * 0.95 / 0.5 = 171 more steps
    assert timefit.fitted_total(20, 100_000, [0.4, 0.6] * 10, 30.0, 2.0) == 20 + 171
    assert timefit.fitted_total(20, 100, [0.5] * 20, 30.0, 2.0) == 100  # never longer than asked
    assert timefit.fitted_total(20, 100_000, [0.5] * 20, 500.0, 2.0) == 21  # out of time: one more step
    assert timefit.fitted_total(20, 100_000, [], 30.0, 2.0) == 100_000  # nothing timed: unchanged
    assert timefit.fitted_total(20, 100_000, [0.5] * 20, 30.0, 0.0) == 100_000  # no limit: unchanged


def test_ready_after_a_count_of_steps():
    assert not timefit.ready([0.1] * (timefit.PACE_STEPS - 1)) and timefit.ready([0.1] * timefit.PACE_STEPS)
