"""train.compile=auto: the decision rule (timings and estimates stubbed), and the engine applying it."""

from __future__ import annotations

import json

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
    monkeypatch.setattr(engine.loop, "decide", fake_decide)
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
    monkeypatch.setattr(engine.loop, "decide", lambda *a: pytest.fail(f"decide called with train.compile={setting}"))
    engine.train(ToyMethod(0.0, 0, 0), NoisyPoints(), train_cfg=TrainConfig(steps=10, batch_size=8, num_workers=0,
                                                                            compile=setting),
                 optim_cfg=OptimConfig(), run_dir=tmp_path / "run")
    assert len(calls) == int(setting)


def test_decide_weighs_a_measured_cached_compile_time_instead_of_the_estimate():
    # 200 steps x 0.5 s x 0.2 = 20 s saved: not worth 1.5 x 100 s, worth 1.5 x 8 s measured with a warm cache
    assert decide("cpu", 0.5, 200, EST).compile is False
    on = decide("cpu", 0.5, 200, EST, compile_seconds=8.0)
    assert on.compile is True and "8 s (measured last time" in on.reason


def test_compile_times_are_remembered_per_model_precision_and_batch(tmp_path, monkeypatch):
    monkeypatch.setenv(compiling.CACHE_ENV, str(tmp_path / "inductor"))
    a, b = torch.nn.Linear(3, 4), torch.nn.Linear(3, 5)
    key = compiling.compile_key(a, "bf16", 32)
    assert compiling.cached_compile_seconds(key) is None
    compiling.record_compile_seconds(key, 7.25)
    assert compiling.cached_compile_seconds(key) == 7.25
    assert len({key, compiling.compile_key(b, "bf16", 32), compiling.compile_key(a, "fp32", 32),
                compiling.compile_key(a, "bf16", 64)}) == 4
    (tmp_path / "inductor" / compiling.LEDGER).write_text("not json")  # a damaged ledger is only a lost hint
    assert compiling.cached_compile_seconds(key) is None


def test_cache_folder_is_the_users_choice_or_beits_own(tmp_path, monkeypatch):
    monkeypatch.delenv(compiling.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compiling.use_persistent_cache() == tmp_path / "beit" / "inductor"
    assert compiling.cache_folder() == tmp_path / "beit" / "inductor"
    monkeypatch.setenv(compiling.CACHE_ENV, str(tmp_path / "mine"))
    assert compiling.use_persistent_cache() == tmp_path / "mine"


class _Compiled(torch.nn.Module):
    """What torch.compile returns, as far as the engine can tell (``_orig_mod``), without compiling."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module

    def forward(self, batch):
        return self._orig_mod(batch)


def test_engine_records_the_first_compiled_step_and_the_next_run_weighs_it(tmp_path, monkeypatch):
    """A run that compiles records its first compiled step's time; the next run of the same model and batch
    hands that measurement to ``decide`` (a different batch: none)."""
    monkeypatch.setenv(compiling.CACHE_ENV, str(tmp_path / "inductor"))
    monkeypatch.setattr(torch, "compile", _Compiled)

    def run(name, compile_, batch, decide_fn=None):
        if decide_fn is not None:
            monkeypatch.setattr(engine.loop, "decide", decide_fn)
        engine.train(ToyMethod(0.0, 0, 0), NoisyPoints(), train_cfg=TrainConfig(steps=8, batch_size=batch, num_workers=0,
                                                                                compile=compile_),
                     optim_cfg=OptimConfig(), run_dir=tmp_path / name)

    run("first", True, 8)
    ledger = json.loads((tmp_path / "inductor" / compiling.LEDGER).read_text())
    assert len(ledger) == 1 and next(iter(ledger.values())) >= 0
    asked = []

    def fake_decide(device_type, step_seconds, steps_left, **kwargs):
        asked.append(kwargs)
        return compiling.CompileChoice(False, "stub")
    run("second", "auto", 8, fake_decide)
    run("other_batch", "auto", 4, fake_decide)
    assert asked[0] == {"compile_seconds": next(iter(ledger.values()))}
    assert asked[1] == {}
