"""Whether a run should use ``torch.compile``: ``train.compile=auto`` decided from the run's own pace.

Compiling costs a fixed time before the first compiled step and then saves a fraction of every step. It pays
only when the steps left are many enough to win that time back. ``auto`` (the default) runs the first
:data:`AUTO_EAGER_STEPS` steps eagerly, takes their median time ``t``, and compiles when

    steps_left * t * (1 - 1 / speedup)  >=  MARGIN * compile_seconds

with ``compile_seconds`` and ``speedup`` from :data:`ESTIMATES` for the device type. ``true``/``false``
always win. A compile that fails (no C++ compiler, an unsupported op) falls back to eager with a warning.

The CPU estimate is the tiny presets' measurement (``bench/compile_cost.py``,
docs/notebook/2026-11-cpu-speed.md: BEiT 58 s for 1.17x, MAE 61 s for 1.26x on one thread of an AMX Xeon; the
lower speed-up is used), so on
CPU ``auto`` compiles a run with more than ~12 minutes of eager steps left. The CUDA figures are an
assumption, not a measurement (no GPU run has timed compilation yet).
"""

from __future__ import annotations

from dataclasses import dataclass

AUTO_EAGER_STEPS = 6  # eager steps timed before ``auto`` decides (the first one, start-up, is not counted)
MARGIN = 1.5  # the expected saving must exceed the compile time by this factor (estimates are rough)


@dataclass(frozen=True)
class Estimate:
    compile_seconds: float
    speedup: float  # eager step time / compiled step time
    measured: bool


ESTIMATES = {
    "cpu": Estimate(compile_seconds=60.0, speedup=1.15, measured=True),
    "cuda": Estimate(compile_seconds=90.0, speedup=1.3, measured=False),
}


@dataclass(frozen=True)
class CompileChoice:
    compile: bool
    reason: str


def decide(device_type: str, step_seconds: float, steps_left: int,
           estimates: dict[str, Estimate] | None = None) -> CompileChoice:
    """``train.compile=auto``: whether to compile now, with a one-line reason for the log (``true`` and
    ``false`` never get here: the engine applies them as they are)."""
    est = (estimates or ESTIMATES).get(device_type)
    if est is None:
        return CompileChoice(False, f"auto: no compile estimate for device {device_type!r}")
    saving = steps_left * step_seconds * (1.0 - 1.0 / est.speedup)
    what = "" if est.measured else " (assumed)"
    facts = (f"{steps_left} steps x {step_seconds:.3f} s left would save ~{saving:.0f} s at "
             f"{est.speedup:.2f}x{what}, compiling costs ~{est.compile_seconds:.0f} s")
    if saving >= MARGIN * est.compile_seconds:
        return CompileChoice(True, f"auto: on ({facts})")
    return CompileChoice(False, f"auto: off ({facts})")

