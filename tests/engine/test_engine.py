"""The training engine: exact resume after SIGKILL, SIGTERM, atomic checkpoints, NaN stop, DDP == 1 process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from beit import checkpoint as ckpt
from beit.config import OptimConfig, TrainConfig
from beit.engine import StepBatchSampler, TrainingError, seed_everything, train
from beit.loading import read_checkpoint
from beit.optim import layer_id, lr_at, param_groups
from tests.helpers.paths import ROOT
from tests.helpers.toy_train import NoisyPoints, ToyMethod

TOY = [sys.executable, "-m", "tests.helpers.toy_train"]


def run_toy(run: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([*TOY, str(run), *args], env=env, capture_output=True, text=True, check=check,
                          timeout=300)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_sigkill_is_exact(tmp_path, workers):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_toy(full, "--steps", "24", "--workers", str(workers))
    killed = run_toy(cut, "--steps", "24", "--kill-at", "13", "--workers", str(workers), check=False)
    assert killed.returncode == -signal.SIGKILL
    assert ckpt.latest_checkpoint(cut).name == "step_00000010"
    run_toy(cut, "--steps", "24", "--resume", "--workers", str(workers))
    a, b = losses(full), losses(cut)
    assert sorted(a) == list(range(1, 25)) and sorted(b) == sorted(a)
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]


def test_resume_with_more_steps_continues(tmp_path):
    run = tmp_path / "run"
    run_toy(run, "--steps", "10")
    out = run_toy(run, "--steps", "15", "--resume")
    assert "step=15" in out.stdout
    assert sorted(losses(run)) == list(range(1, 16))


def test_existing_run_needs_resume(tmp_path):
    run = tmp_path / "run"
    run_toy(run, "--steps", "5")
    with pytest.raises(TrainingError, match="--resume"):
        train(ToyMethod(0.0, 0, 0), NoisyPoints(), train_cfg=TrainConfig(steps=5, batch_size=8, num_workers=0),
              optim_cfg=OptimConfig(), run_dir=run)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*TOY, str(run), "--steps", "100000", "--ckpt-every", "100000"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "status=interrupted" in out
    last = ckpt.latest_checkpoint(run)
    assert last is not None
    step = int(last.name.split("_")[1])
    assert step == max(losses(run))


def test_sigterm_to_the_process_group_with_loader_workers(tmp_path):
    """`timeout`, Ctrl-C and schedulers signal every process of the group: the loader workers must leave the
    stop to the main process (before, a worker died first and the run ended with an error, no checkpoint)."""
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*TOY, str(run), "--steps", "100000", "--ckpt-every", "100000", "--workers", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "status=interrupted" in out
    last = ckpt.latest_checkpoint(run)
    assert last is not None and int(last.name.split("_")[1]) == max(losses(run))


def test_loader_workers_are_gone_when_train_returns(tmp_path, monkeypatch):
    """The training loader's workers ignore SIGTERM, so a loader iterator left alive after a run would hang the
    process at exit (multiprocessing's exit handler SIGTERMs its children, then waits). train() stops them
    itself, even while something else still holds the iterator."""
    import multiprocessing

    from beit import engine

    kept = []
    original = engine.Trainer.batches

    def batches_kept_elsewhere(self):
        it = original(self)
        kept.append(it)  # a reference train() does not own (a traceback, a cycle, a user's hook)
        return it

    monkeypatch.setattr(engine.Trainer, "batches", batches_kept_elsewhere)
    tcfg = TrainConfig(steps=4, batch_size=8, num_workers=2, log_every=1, ckpt_every=100, precision="fp32")
    train(ToyMethod(0.0, 0, 0), NoisyPoints(), train_cfg=tcfg, optim_cfg=OptimConfig(lr=1e-2), run_dir=tmp_path / "r")
    assert kept and not getattr(kept[0], "_workers", [None])[0].is_alive()
    assert multiprocessing.active_children() == []


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    out = run_toy(run, "--steps", "20", "--nan-at", "8", check=False)
    assert out.returncode != 0
    assert "loss is nan at step 8" in out.stderr
    assert ckpt.latest_checkpoint(run).name == "step_00000005"
    state, _, _ = read_checkpoint(ckpt.latest_checkpoint(run))
    assert all(torch.isfinite(v).all() for v in state.values())


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    seed_everything(0)
    method = ToyMethod(0.0, 0, 0)
    first = ckpt.save_checkpoint(tmp_path, 5, method.state_dict())
    calls = {"n": 0}
    real = ckpt.save_file

    def failing(tensors, path, *a, **k):
        calls["n"] += 1
        real(tensors, path, *a, **k)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", failing)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 10, {k: v + 1 for k, v in method.state_dict().items()})
    assert calls["n"] == 1
    assert ckpt.latest_checkpoint(tmp_path) == first
    state, meta, _ = read_checkpoint(first)
    assert meta["step"] == 5
    assert all(torch.equal(state[k], v) for k, v in method.state_dict().items())
    assert not (tmp_path / "checkpoints" / "step_00000010").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_toy(one, "--steps", "12", "--dropout", "0", "--batch-size", "8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for _attempt in range(2):  # a port the OS says is free can be taken before torchrun binds it (tests run in parallel)
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                              str(_free_port()), "-m", "tests.helpers.toy_train", str(two), "--steps", "12",
                              "--dropout", "0", "--batch-size", "8"], env=env, capture_output=True, text=True, timeout=300)
        if res.returncode == 0 or "address already in use" not in (res.stderr + res.stdout).lower():
            break
        shutil.rmtree(two, ignore_errors=True)
    assert res.returncode == 0, res.stderr[-4000:]
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for s in a:
        assert abs(a[s] - b[s]) < 1e-5, (s, a[s], b[s])
    wa, _, _ = read_checkpoint(ckpt.latest_checkpoint(one))
    wb, _, _ = read_checkpoint(ckpt.latest_checkpoint(two))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-5)


def test_accumulation_equals_large_batch(tmp_path):
    one, acc = tmp_path / "one", tmp_path / "acc"
    run_toy(one, "--steps", "6", "--dropout", "0")
    run_toy(acc, "--steps", "6", "--dropout", "0", "--accum", "2")
    a, b = losses(one), losses(acc)
    for s in a:
        assert abs(a[s] - b[s]) < 1e-5


def test_sampler_partitions_global_batch():
    full = list(StepBatchSampler(20, 8, 3, 0, 4, 0, 1, 1))
    r0 = list(StepBatchSampler(20, 8, 3, 0, 4, 0, 2, 2))
    r1 = list(StepBatchSampler(20, 8, 3, 0, 4, 1, 2, 2))
    for s in range(4):
        merged = r0[2 * s] + r0[2 * s + 1] + r1[2 * s] + r1[2 * s + 1]
        assert merged == full[s]
    # an epoch (2 steps of 8 from 20 samples) never repeats a sample
    assert len({i for _, i in full[0] + full[1]}) == 16
    # resume in the middle yields the same tail
    assert list(StepBatchSampler(20, 8, 3, 2, 4, 0, 1, 1)) == full[2:]


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(10, 100, cfg) == pytest.approx(1.0)
    assert lr_at(55, 100, cfg) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(100, 100, cfg) == pytest.approx(0.1)


def test_layer_decay_groups():
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.patch_embed = nn.Linear(4, 4)
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
            self.head = nn.Linear(4, 2)

        def no_weight_decay(self):
            return {"cls_token"}

    groups = param_groups(Tiny(), weight_decay=0.05, layer_decay=0.5, num_layers=3)
    scale = {n: (g["lr_scale"], g["weight_decay"]) for g in groups for n in g["param_names"]}
    assert scale["cls_token"] == (0.5**4, 0.0)
    assert scale["patch_embed.weight"] == (0.5**4, 0.05)
    assert scale["patch_embed.bias"] == (0.5**4, 0.0)
    assert scale["blocks.0.weight"] == (0.5**3, 0.05)
    assert scale["blocks.2.weight"] == (0.5**1, 0.05)
    assert scale["head.weight"] == (1.0, 0.05)
    assert layer_id("model.blocks.11.attn.qkv.weight", 12) == 12
    assert layer_id("model.rel_pos_bias.relative_position_bias_table", 12) == 13
