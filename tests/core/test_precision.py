"""``train.precision=auto``: the decision rule, with the timing replaced (no wall-time assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from beit import machine as beit_machine
from beit import precision
from beit.config import ConfigError, OptimConfig, TrainConfig
from beit.engine import train
from tests.helpers.toy_train import NoisyPoints, ToyMethod


@pytest.fixture
def fresh_cache(monkeypatch):
    """An empty per-process measurement cache, so each test measures (with its stub) once."""
    monkeypatch.setattr(precision, "_SPEEDUP_CACHE", {})


def stub_timer(speedup: float, calls: list):
    def timer() -> float:
        calls.append(1)
        return speedup

    return timer


@pytest.mark.parametrize("speedup,expected", [
    (0.01, "fp32"),  # AVX2 without native bf16: ~100x slower (the AMD EPYC)
    (0.9, "fp32"),  # AVX-512 without bf16 instructions: about even
    (precision.MIN_BF16_SPEEDUP - 0.01, "fp32"),
    (precision.MIN_BF16_SPEEDUP, "bf16"),
    (4.3, "bf16"),  # AVX-512-BF16 / AMX (this project's CI machine)
])
def test_cpu_choice_follows_the_measured_speedup(speedup, expected):
    choice = precision.decide("cpu", cpu_speedup=speedup)
    assert choice.precision == expected
    assert choice.reason.startswith("auto: CPU bf16 matmul")


def test_cuda_choice_depends_on_bf16_support():
    assert precision.decide("cuda", cuda_bf16=True).precision == "bf16"
    assert precision.decide("cuda", cuda_bf16=False).precision == "fp16"
    assert precision.decide("mps").precision == "fp32"


def test_auto_on_cpu_measures_once_per_process(fresh_cache):
    calls: list = []
    slow = stub_timer(0.01, calls)
    assert precision.resolve("auto", "cpu", timer=slow).precision == "fp32"
    assert precision.resolve("auto", torch.device("cpu"), timer=slow).precision == "fp32"
    assert len(calls) == 1


def test_auto_picks_bf16_where_measured_faster(fresh_cache):
    assert precision.resolve("auto", "cpu", timer=stub_timer(3.0, [])).precision == "bf16"


@pytest.mark.parametrize("explicit", ["fp32", "bf16", "fp16"])
def test_explicit_precision_wins_without_measuring(fresh_cache, explicit):
    calls: list = []
    choice = precision.resolve(explicit, "cpu", timer=stub_timer(0.01, calls))
    assert choice.precision == explicit and calls == []


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="train.precision"):
        TrainConfig(precision="fp8")
    assert TrainConfig().precision == "auto"


def test_real_probe_returns_a_positive_ratio():
    assert precision.cpu_bf16_speedup(n=32, reps=2) > 0


class FakeClock:
    """``time.perf_counter`` for :func:`precision._best_seconds`: each call of ``work`` lasts the next given time."""

    def __init__(self, durations: list[float]) -> None:
        self.now, self.durations, self.calls = 0.0, list(durations), 0

    def perf_counter(self) -> float:
        return self.now

    def work(self) -> None:
        self.now += self.durations[self.calls]
        self.calls += 1


def test_one_preempted_sample_does_not_decide(monkeypatch):
    # warm-up, then one call preempted by another process (50 ms) among 0.2 ms ones: the best is the fast one
    clock = FakeClock([1.0, 0.05, 2e-4, 2e-4, 2e-4, 2e-4])
    monkeypatch.setattr(precision.time, "perf_counter", clock.perf_counter)
    assert precision._best_seconds(clock.work, reps=5, give_up_after=2e-3) == pytest.approx(2e-4)
    assert clock.calls == 6


def test_a_slow_kind_is_given_up_after_the_minimum_samples(monkeypatch):
    # bf16 on an AVX2 CPU: every call slow; stop after MIN_REPS timed calls instead of all of them
    clock = FakeClock([1.0] + [0.06] * 10)
    monkeypatch.setattr(precision.time, "perf_counter", clock.perf_counter)
    assert precision._best_seconds(clock.work, reps=10, give_up_after=2e-3) == pytest.approx(0.06)
    assert clock.calls == 1 + precision.MIN_REPS


def _toy_run(tmp_path, monkeypatch, speedup: float, name: str, resume: bool = False, steps: int = 3):
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
    monkeypatch.setattr(precision, "_SPEEDUP_CACHE", {})
    cfg = TrainConfig(steps=steps, batch_size=8, num_workers=0, log_every=1, device="cpu")
    yaml_text = yaml.safe_dump({"train": {"precision": "auto", "steps": steps}})
    train(ToyMethod(0.0, 0, 0), NoisyPoints(), train_cfg=cfg, optim_cfg=OptimConfig(), run_dir=tmp_path / name,
          config_yaml=yaml_text, resume=resume)
    rows = [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    saved = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
    return rows, saved


@pytest.mark.parametrize("speedup,expected", [(0.01, "fp32"), (4.0, "bf16")])
def test_run_records_the_chosen_precision(tmp_path, monkeypatch, caplog, speedup, expected):
    caplog.set_level("INFO", logger="beit")
    rows, saved = _toy_run(tmp_path, monkeypatch, speedup, "run")
    assert saved["train"]["precision"] == expected
    assert {r["precision"] for r in rows if "loss" in r} == {expected}
    assert all(r["data_time"] >= 0 and r["step_time"] > 0 for r in rows if "loss" in r)  # which one limits
    assert sum("precision: " + expected in r.message for r in caplog.records) == 1


def test_resumed_auto_run_keeps_its_precision(tmp_path, monkeypatch):
    _toy_run(tmp_path, monkeypatch, 4.0, "run", steps=3)
    rows, saved = _toy_run(tmp_path, monkeypatch, 0.01, "run", resume=True, steps=5)  # the machine "changed"
    assert saved["train"]["precision"] == "bf16"
    assert [r["precision"] for r in rows if r["step"] > 3] == ["bf16", "bf16"]


@pytest.mark.skipif("avx2" not in beit_machine.cpu_flags(), reason="needs an x86 CPU with AVX2")
def test_auto_is_fp32_when_the_libraries_are_capped_at_avx2():
    """The real measurement, not a stub, in a process whose libraries are capped at AVX2 (how an AVX2-only CPU
    computes: bf16 matmuls ~100x slower than fp32, so the decision has a wide margin either way)."""
    code = ("import torch; from beit import precision; torch.set_num_threads(1); "
            "c = precision.resolve('auto', 'cpu'); print(torch.backends.cpu.get_cpu_capability(), c.precision)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **beit_machine.AVX2_CAPS}, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out == ["AVX2", "fp32"]
