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

Compiled artefacts persist across runs (:func:`use_persistent_cache`: PyTorch's FX-graph and AOTAutograd
caches in the user's cache folder, not in ``/tmp``), and a run that compiled records how long its first
compiled step took beyond an eager one (:func:`record_compile_seconds`, keyed by the module, precision,
batch, threads and torch). The next run of the same model finds the artefacts and that measurement:
``auto`` then weighs the measured seconds (a warm cache: 1-11 s instead of ~60 s for the tiny presets,
notebook 2026-12-03), so short runs of a model that compiled before compile too. A model that never compiled
has no measurement and keeps the estimate.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

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
           estimates: dict[str, Estimate] | None = None, compile_seconds: float | None = None) -> CompileChoice:
    """``train.compile=auto``: whether to compile now, with a one-line reason for the log (``true`` and
    ``false`` never get here: the engine applies them as they are). ``compile_seconds``: what compiling this
    model took last time with the artefacts cached (:func:`cached_compile_seconds`), instead of the estimate."""
    est = (estimates or ESTIMATES).get(device_type)
    if est is None:
        return CompileChoice(False, f"auto: no compile estimate for device {device_type!r}")
    cost, how = est.compile_seconds, ""
    if compile_seconds is not None:
        cost, how = compile_seconds, " (measured last time, artefacts cached)"
    saving = steps_left * step_seconds * (1.0 - 1.0 / est.speedup)
    what = "" if est.measured else " (assumed)"
    facts = (f"{steps_left} steps x {step_seconds:.3f} s left would save ~{saving:.0f} s at "
             f"{est.speedup:.2f}x{what}, compiling costs ~{cost:.0f} s{how}")
    if saving >= MARGIN * cost:
        return CompileChoice(True, f"auto: on ({facts})")
    return CompileChoice(False, f"auto: off ({facts})")


# --------------------------------------------------------------------------------------------- the cache

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # PyTorch's compile caches live under this folder
LEDGER = "beit_compile_seconds.json"  # our measured compile times, beside PyTorch's artefacts


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/beit/inductor`` (``~/.cache/beit/inductor``): kept across reboots, unlike PyTorch's
    default ``/tmp/torchinductor_$USER``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "beit" / "inductor"


def use_persistent_cache() -> Path:
    """Point PyTorch's compile caches at :func:`default_cache_dir` unless the user chose a folder; call
    before ``torch.compile`` (PyTorch reads the variable when it compiles). Returns the folder."""
    os.environ.setdefault(CACHE_ENV, str(default_cache_dir()))
    return cache_folder()


def cache_folder() -> Path:
    """The folder compiled artefacts go to (or will, once :func:`use_persistent_cache` has run)."""
    return Path(os.environ.get(CACHE_ENV) or default_cache_dir())


def compile_key(module: torch.nn.Module, precision: str, batch_size: int) -> str:
    """What a compiled graph depends on: the module's structure, precision, batch, threads, torch version."""
    text = "|".join((repr(module), precision, str(batch_size), str(torch.get_num_threads()), torch.__version__))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _ledger() -> dict:
    try:
        data = json.loads((cache_folder() / LEDGER).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_compile_seconds(key: str) -> float | None:
    """The compile time recorded for ``key`` by an earlier run (its artefacts are in the cache), or None."""
    value = _ledger().get(key)
    return float(value) if isinstance(value, (int, float)) and value >= 0 else None


def record_compile_seconds(key: str, seconds: float) -> None:
    """Remember what compiling ``key`` cost (written atomically; a failure only loses the hint)."""
    folder = cache_folder()
    data = _ledger()
    data[key] = round(max(0.0, seconds), 2)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{LEDGER}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(folder / LEDGER)
    except OSError:
        pass

