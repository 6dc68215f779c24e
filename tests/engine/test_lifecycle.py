"""The one lifecycle, ``beit.engine.run(task, cfg, out)``, followed by a toy task defined in this file alone:
"adding a task = filling in one object". The task (is a random image brighter than mid-grey?) fills in
:class:`beit.engine.TrainingTask` -- ``build`` -> :class:`beit.engine.Training`, plus the ``claimed``,
``save`` and ``outputs`` hooks -- and gets everything else from the engine: the folder claimed once, the
config saved and checked on resume, checkpoints (the best one too), exact resume after SIGTERM, ``run.json``,
``metrics.jsonl``; its weights load back through ``beit.load`` and start a second run.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import beit
from beit.config import ConfigError, ModelConfig, OptimConfig, TrainConfig
from beit.engine import DistEnv, Training, TrainingError, TrainingTask, TrainResult, run, take_stop_signal
from beit.methods.base import Method
from beit.models.vit import VisionTransformer
from beit.runs import RunDir, RunError

# --------------------------------------------------------------------------------------------- the toy task


@dataclass
class ToyConfig:
    init: str = ""  # a backbone beit.load reads; "": a fresh one of `model`
    images: int = 24  # random training images (8 more are held out)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, drop_path_rate=0.0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=1))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=6, batch_size=4, num_workers=0, device="cpu", precision="fp32", log_every=1, ckpt_every=2,
        compile=False))


class RandomImages(Dataset):
    """Fixed random images plus fresh noise on every draw (augmentation from the global RNG, which the engine
    seeds per sample: what makes resume exact)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 8, 8, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return (self.images[i] + 0.05 * torch.randn(3, 8, 8)).clamp(0, 1)


class Brightness(Method):
    """``batch (B, 3, 8, 8)`` -> CE of "mean pixel > 0.5" from the backbone's pooled patch tokens."""

    best_metric = "acc"
    state_prefix = "model."  # what beit.load returns

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        self.model, self.head = model, nn.Linear(model.embed_dim, 2)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.forward_features(images)[:, 1:].mean(1))  # (B, 2)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return F.cross_entropy(self.logits(images), (images.mean((1, 2, 3)) > 0.5).long()), {}

    @torch.no_grad()
    def evaluate(self, loader) -> dict[str, float]:
        hit = n = 0
        for images in loader:
            target = (images.mean((1, 2, 3)) > 0.5).long()
            hit, n = hit + int((self.logits(images).argmax(-1) == target).sum()), n + len(target)
        return {"acc": 100.0 * hit / max(n, 1)}


class ToyTask(TrainingTask):
    """The whole task: what to train on what, and what the run writes besides its checkpoints."""

    def __init__(self, stop_at: int = 0) -> None:
        self.stop_at = stop_at  # send this process SIGTERM after that step (a scheduler stopping the job)

    def build(self, cfg: ToyConfig, env: DistEnv, out: Path, resume: bool) -> Training:
        model = beit.load(cfg.init) if cfg.init else VisionTransformer(cfg.model)
        self.method = Brightness(model)
        if self.stop_at:
            self.method.after_step = lambda step, total: step == self.stop_at and os.kill(os.getpid(), signal.SIGTERM)
        return Training(self.method, RandomImages(cfg.images, seed=0), cfg, val_dataset=RandomImages(8, seed=1),
                        desc="toy")

    def claimed(self, training: Training, env: DistEnv, out: Path) -> None:
        (out / "toy.txt").write_text("written once the folder is the run's\n")

    def save(self, training: Training, result: TrainResult) -> None:
        torch.save(self.method.head.state_dict(), Path(result.run_dir) / "head.pt")  # the task's own product

    def outputs(self, training: Training, result: TrainResult) -> dict:
        return {"summary.json": lambda: (Path(result.run_dir) / "summary.json").write_text(json.dumps(result.best_eval)),
                "broken.png": lambda: 1 / 0}  # a failed picture is a warning, never a lost run


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# --------------------------------------------------------------------------------------------- the tests


def test_a_toy_task_trains_checkpoints_and_loads_through_the_lifecycle(tmp_path, monkeypatch, caplog):
    claims = []
    real_claim = RunDir.claim
    monkeypatch.setattr(RunDir, "claim", lambda self, kind, resume: claims.append(kind) or real_claim(self, kind, resume))
    task = ToyTask()
    res = run(task, ToyConfig(), tmp_path / "toy")

    assert (res.status, res.step) == ("done", 6)
    assert claims == [None]  # claimed once (a toy's config names no built-in kind)
    folder = RunDir(tmp_path / "toy")
    kept = sorted(int(p.name.split("_")[1]) for p in folder.checkpoints_path.glob("step_*"))
    assert kept[-1] == 6 and set(kept) <= {2, 4, 6}  # every train.ckpt_every=2 steps (the newest kept)
    assert (folder.checkpoints_path / "best" / "model.safetensors").is_file()
    assert sorted(losses(folder.path)) == [1, 2, 3, 4, 5, 6]
    assert folder.config()["images"] == 24 and (folder.path / "toy.txt").is_file()
    assert (folder.path / "head.pt").is_file()
    assert json.loads((folder.path / "summary.json").read_text()) == res.best_eval
    assert "could not write broken.png" in caplog.text

    backbone = beit.load(folder.path)  # the public way in for weights
    assert isinstance(backbone, VisionTransformer)
    trained = task.method.model.state_dict()
    assert backbone.state_dict().keys() == trained.keys()
    assert all(torch.equal(backbone.state_dict()[k], trained[k]) for k in trained)

    # a second run starts from the first one's backbone, loaded by its build
    second = ToyTask()
    run(second, ToyConfig(init=str(folder.path), train=TrainConfig(steps=1, batch_size=4, num_workers=0,
                                                                   device="cpu", precision="fp32", compile=False)),
        tmp_path / "second")
    assert RunDir(tmp_path / "second").config()["init"] == str(folder.path)
    with pytest.raises(TrainingError, match="already holds checkpoints"):  # a finished run is never overwritten
        run(ToyTask(), ToyConfig(), tmp_path / "toy")


def test_a_toy_task_resumes_exactly_after_sigterm(tmp_path):
    whole = run(ToyTask(), ToyConfig(), tmp_path / "whole")
    assert whole.status == "done"

    stopped = run(ToyTask(stop_at=3), ToyConfig(), tmp_path / "stopped")
    assert (stopped.status, stopped.step) == ("interrupted", 3)
    assert take_stop_signal() == signal.SIGTERM  # what the CLI turns into exit status 143
    assert int(RunDir(tmp_path / "stopped").latest().name.split("_")[1]) == 3  # saved on the way out
    assert (tmp_path / "stopped" / "head.pt").is_file()  # the task's product is saved for a stopped run too
    with pytest.raises(RunError, match="images 24 -> 20"):  # a resume is checked against the config it saved
        run(ToyTask(), ToyConfig(images=20), tmp_path / "stopped", resume=True)
    resumed = run(ToyTask(), ToyConfig(), tmp_path / "stopped", resume=True)
    assert (resumed.status, resumed.step) == ("done", 6)

    a, b = losses(tmp_path / "whole"), losses(tmp_path / "stopped")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [b[s] for s in range(1, 7)] == pytest.approx([a[s] for s in range(1, 7)], rel=1e-5, abs=1e-6)


def test_build_errors_leave_the_folder_unclaimed(tmp_path):
    class Broken(ToyTask):
        def build(self, cfg, env, out, resume):
            raise ConfigError("no data")

    with pytest.raises(ConfigError):
        run(Broken(), ToyConfig(), tmp_path / "never")
    assert not (tmp_path / "never").exists()  # nothing is written before the task is built


def test_a_run_fitted_to_its_minutes_completes_its_schedule_and_resumes_at_that_length(tmp_path):
    """``train.fit_to_time`` with ``--max-minutes``: 100,000 steps asked, 6 seconds given; after 20 timed steps
    the run is shortened to what fits, so its learning rate decays to the end instead of being cut at the peak;
    a resumed run keeps the fitted length."""
    def cfg(**kw):
        return ToyConfig(train=TrainConfig(steps=100_000, batch_size=4, num_workers=0, device="cpu", precision="fp32",
                                           log_every=1, ckpt_every=10**9, eval_every=10**9, compile=False,
                                           fit_to_time=True, **kw))

    res = run(ToyTask(), cfg(), tmp_path / "fitted", max_minutes=0.1)
    rows = [json.loads(ln) for ln in (tmp_path / "fitted" / "metrics.jsonl").read_text().splitlines()]
    fit = [r for r in rows if "fitted_total_steps" in r]
    assert len(fit) == 1 and fit[0]["step"] == 21  # the first iteration (start-up) is not timed, then 20 are
    total = fit[0]["fitted_total_steps"]
    assert 21 < total < 100_000
    assert res.status == "done" or res.step >= 0.9 * total  # the clock may still win by a hair on a busy machine
    lrs = [r["lr"] for r in rows if "lr" in r]
    if res.status == "done":
        assert res.step == total and lrs[-1] == pytest.approx(cfg().optim.min_lr, rel=0.01)  # the cosine ended

    stopped = run(ToyTask(stop_at=30), cfg(), tmp_path / "again", max_minutes=0.1)
    assert stopped.status == "interrupted" and take_stop_signal() == signal.SIGTERM
    again = [json.loads(ln) for ln in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    kept = next(r["fitted_total_steps"] for r in again if "fitted_total_steps" in r)
    resumed = run(ToyTask(), cfg(), tmp_path / "again", resume=True, max_minutes=10)
    assert (resumed.status, resumed.step) == ("done", kept)  # not refitted to its 10 minutes, nor back to 100,000

    unfitted = run(ToyTask(stop_at=0), ToyConfig(train=TrainConfig(steps=40, batch_size=4, num_workers=0, device="cpu",
                   precision="fp32", compile=False, fit_to_time=True)), tmp_path / "no_clock")
    assert unfitted.step == 40  # without --max-minutes there is nothing to fit to
