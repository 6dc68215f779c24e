"""Which floating-point precision a run computes in: ``train.precision=auto`` resolved on this machine.

bf16 autocast is a 1.5-4x win on CPUs with native bf16 (AVX-512-BF16, AMX) and a ~100x loss on CPUs
without it (AVX2: oneDNN falls back to slow conversion loops; measured 0.6 vs 64 GFLOP/s on a 1024^2
matmul on an AMD EPYC). So on CPU ``auto`` is decided by measurement, never by assumption: a short
bf16-vs-fp32 matmul timing, made once per process. On CUDA it is bf16 where the card supports it (Ampere
and newer), else fp16 with the gradient scaler. An explicit ``fp32``/``bf16``/``fp16`` always wins.

    >>> resolve("auto", torch.device("cpu"))
    Choice(precision='bf16', reason='auto: CPU bf16 matmul 4.3x faster than fp32 (AVX512)')
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from .config import TrainConfig

log = logging.getLogger("beit")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# bf16 must beat fp32 by this factor on the probe matmul: a training step gains less than a bare matmul
# (casts, fp32 softmax/norms), measured 4x on the matmul -> 1.5x on the tiny preset's step.
MIN_BF16_SPEEDUP = 1.5
PROBE_SIZE = 256  # an (n x n) @ (n x n) matmul: ~0.2 ms in fp32 on one modern core


@dataclass(frozen=True)
class Choice:
    precision: str  # fp32 | bf16 | fp16
    reason: str  # one line for the log and the report


MIN_REPS = 3  # samples before giving up on a slow kind: one sample can be a preemption on a busy machine


def _best_seconds(fn: Callable[[], object], reps: int, give_up_after: float) -> float:
    """Best of ``reps`` timed calls of ``fn``; stops early when the best of the first :data:`MIN_REPS` is
    still over ``give_up_after`` (bf16 on an AVX2 CPU: no need to time it more). A single slow sample
    never decides: with three single-thread jobs on two cores, one preempted call of a 0.2 ms matmul once
    read as 26x slower and made ``auto`` choose fp32 on an AMX CPU."""
    fn()  # first call: oneDNN primitive creation, not counted
    best = float("inf")
    for i in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        if i + 1 >= MIN_REPS and best > give_up_after:
            break
    return best


def cpu_bf16_speedup(n: int = PROBE_SIZE, reps: int = 5, rounds: int = 3) -> float:
    """fp32 time / bf16 time of an ``n^3`` matmul on this CPU with the current thread count: best of
    ``reps`` each, in ``rounds`` alternating rounds, so that a busy machine slows both alike (two processes
    started together on a loaded 2-core machine once chose differently with a single round)."""
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    t32 = t16 = float("inf")
    for _ in range(rounds):
        t32 = min(t32, _best_seconds(lambda: a32 @ b32, reps, give_up_after=float("inf")))
        t16 = min(t16, _best_seconds(lambda: a16 @ b16, reps, give_up_after=10 * t32))
        if t16 > 10 * t32:  # no native bf16 (AVX2): one round says enough
            break
    return t32 / t16


# speedup measurements, per torch thread count: "cached per process"
_SPEEDUP_CACHE: dict[int, float] = {}


def measured_cpu_bf16_speedup(timer: Callable[[], float] | None = None) -> float:
    """:func:`cpu_bf16_speedup`, measured once per process and thread count (``timer`` replaces it in tests)."""
    key = torch.get_num_threads()
    if key not in _SPEEDUP_CACHE:
        _SPEEDUP_CACHE[key] = (timer or cpu_bf16_speedup)()
    return _SPEEDUP_CACHE[key]


def decide(device_type: str, *, cuda_bf16: bool = False, cpu_speedup: float | None = None) -> Choice:
    """The rule behind ``auto``, from facts about the machine (pure: the tests call it directly)."""
    if device_type == "cuda":
        if cuda_bf16:
            return Choice("bf16", "auto: CUDA with bf16 support")
        return Choice("fp16", "auto: CUDA without bf16 support: fp16 with the gradient scaler")
    if device_type != "cpu" or cpu_speedup is None:
        return Choice("fp32", f"auto: fp32 on {device_type}")
    isa = torch.backends.cpu.get_cpu_capability()
    if cpu_speedup >= MIN_BF16_SPEEDUP:
        return Choice("bf16", f"auto: CPU bf16 matmul {cpu_speedup:.1f}x faster than fp32 ({isa})")
    return Choice("fp32", f"auto: CPU bf16 matmul {cpu_speedup:.2g}x the speed of fp32 ({isa}): fp32 is faster "
                          f"here (bf16 needs >= {MIN_BF16_SPEEDUP}x)")


def resolve(requested: str, device: torch.device | str, timer: Callable[[], float] | None = None) -> Choice:
    """The precision to run in: ``requested`` unless it is ``auto``; then :func:`decide` on this machine."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested != "auto":
        return Choice(requested, "as configured")
    device = torch.device(device)
    if device.type == "cuda":
        return decide("cuda", cuda_bf16=torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return decide("cpu", cpu_speedup=rank0_value(measured_cpu_bf16_speedup(timer)))
    return decide(device.type)


def rank0_value(value: float, device: torch.device | None = None) -> float:
    """Under torchrun every process must decide alike: all take rank 0's ``value`` (a timing), broadcast
    through a tensor on ``device`` (CPU by default; a CPU tensor cannot travel over nccl, where the value is
    returned unchanged: pass the CUDA device when it differs between processes)."""
    device = device or torch.device("cpu")
    if not (dist.is_available() and dist.is_initialized()) or (dist.get_backend() == "nccl" and device.type != "cuda"):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def for_run(train_cfg: TrainConfig, device: torch.device, run_dir: Path, resume: bool,
            config_yaml: str | None) -> tuple[TrainConfig, str | None, Choice]:
    """Resolve ``train_cfg.precision`` for a run; returns the config and its YAML with the choice written in.

    A resumed ``auto`` run keeps the precision it started with (its ``config.yaml``), so resuming gives the
    same losses as an uninterrupted run even if a new measurement would tip the other way.
    """
    previous = _previous_precision(run_dir / "config.yaml") if resume else None
    if train_cfg.precision == "auto" and previous is not None:
        choice = Choice(previous, "auto: as when the run started (config.yaml)")
    else:
        choice = resolve(train_cfg.precision, device)
    if config_yaml is not None:
        data = yaml.safe_load(config_yaml) or {}
        if isinstance(data.get("train"), dict):
            data["train"]["precision"] = choice.precision
            config_yaml = yaml.safe_dump(data, sort_keys=False)
    return dataclasses.replace(train_cfg, precision=choice.precision), config_yaml, choice


def _previous_precision(path: Path) -> str | None:
    try:
        value = (yaml.safe_load(path.read_text()) or {}).get("train", {}).get("precision")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return value if value in ("fp32", "bf16", "fp16") else None


__all__ = ["Choice", "MIN_BF16_SPEEDUP", "PRECISIONS", "cpu_bf16_speedup", "decide", "for_run", "rank0_value",
           "measured_cpu_bf16_speedup", "resolve"]
