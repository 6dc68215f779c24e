"""train.compile=auto: the decision rule (timings and estimates stubbed), and the engine applying it."""

from __future__ import annotations

import pytest
import torch

from beit import compiling, engine
from beit.compiling import Estimate, decide
from beit.config import ConfigError, OptimConfig, TrainConfig
from tests.helpers.toy_train import NoisyPoints, ToyMethod

EST = {"cpu": Estimate(compile_seconds=100.0, speedup=1.25, measured=True)}


def test_decide_auto_compiles_only_when_the_rest_of_the_run_pays():
    # saving = steps x t x (1 - 1/1.25) = steps x t x 0.2; it must reach 1.5 x 100 s = 150 s
    assert decide("cpu", 0.5, 1490, EST).compile is False  # 149 s
    on = decide("cpu", 0.5, 1510, EST)  # 151 s
    assert on.compile is True and on.reason.startswith("auto: on") and "100 s" in on.reason
    assert decide("cpu", 0.05, 1500, EST).compile is False  # a fast step: 10x the steps needed
    assert decide("mps", 1.0, 10**6, EST).compile is False  # no estimate for this device


def test_config_accepts_true_false_auto_only():
    from beit.config import from_dict

    assert from_dict(TrainConfig, {"compile": "auto"}).compile == "auto"
    assert from_dict(TrainConfig, {"compile": "true"}).compile is True
    assert TrainConfig().compile == "auto"
    with pytest.raises(ConfigError, match="train.compile"):
        from_dict(TrainConfig, {"compile": "sometimes"})


@pytest.mark.parametrize("steps,expect", [(12, False), (400, True)])
def test_engine_auto_compiles_after_timing_the_first_steps(tmp_path, monkeypatch, steps, expect):
    """The engine times AUTO_EAGER_STEPS eager steps, asks ``decide`` with the steps left, and compiles when
    told to (``decide`` and torch.compile replaced by recorders: no real compilation in the test suite)."""
    calls, asked = [], []

    def fake_compile(module):
        calls.append(module)
        return module

    def fake_decide(device_type, step_seconds, steps_left):
        asked.append((device_type, step_seconds, steps_left))
        return compiling.CompileChoice(steps_left > 100, "stub")

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(engine, "decide", fake_decide)
    res = engine.train(ToyMethod(0.0, 0, 0), NoisyPoints(), train_cfg=TrainConfig(steps=steps, batch_size=8,
                                                                                   num_workers=0),
                       optim_cfg=OptimConfig(), run_dir=tmp_path / "run")
    assert res.step == steps
    assert len(asked) == 1
    device_type, step_seconds, left = asked[0]
    assert (device_type, left) == ("cpu", steps - compiling.AUTO_EAGER_STEPS)
    assert step_seconds > 0
    assert bool(calls) is expect


@pytest.mark.parametrize("setting", [False, True])
def test_engine_explicit_setting_wins_without_asking(tmp_path, monkeypatch, setting):
    """``train.compile=true|false`` is applied as given (true: compiled before the first step); ``decide``
    is never consulted."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda module: calls.append(module) or module)
    monkeypatch.setattr(engine, "decide", lambda *a: pytest.fail(f"decide called with train.compile={setting}"))
    engine.train(ToyMethod(0.0, 0, 0), NoisyPoints(), train_cfg=TrainConfig(steps=10, batch_size=8, num_workers=0,
                                                                            compile=setting),
                 optim_cfg=OptimConfig(), run_dir=tmp_path / "run")
    assert len(calls) == int(setting)
