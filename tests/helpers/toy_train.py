"""A tiny method + dataset driven through the real engine, for tests that need a separate process
(SIGKILL resume, SIGTERM, torchrun DDP). Usage:

    python -m tests.helpers.toy_train RUN --steps 30 [--resume] [--kill-at 17] [--workers 2] [--dropout 0.1]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import Dataset

from beit.config import OptimConfig, TrainConfig
from beit.engine import seed_everything, setup_distributed, train


class NoisyPoints(Dataset):
    """Fixed points plus fresh noise on every draw: augmentation that uses the global torch RNG."""

    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return {"x": self.x[i] + 0.1 * torch.randn(8), "y": self.y[i]}


class ToyMethod(nn.Module):
    def __init__(self, dropout: float, kill_at: int, nan_at: int):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(dropout), nn.Linear(32, 2))
        self.kill_at = kill_at
        self.nan_at = nan_at
        self.calls = 0

    def forward(self, batch):
        logits = self.model(batch["x"])
        loss = nn.functional.cross_entropy(logits, batch["y"])
        self.calls += 1
        if self.nan_at and self.calls >= self.nan_at:
            loss = loss * float("nan")
        acc = (logits.argmax(1) == batch["y"]).float().mean()
        return loss, {"acc": acc}

    def after_step(self, step: int, total_steps: int) -> None:
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-at", type=int, default=0)
    p.add_argument("--nan-at", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--ckpt-every", type=int, default=5)
    a = p.parse_args(argv)
    env = setup_distributed("cpu")
    seed_everything(0)
    method = ToyMethod(a.dropout, a.kill_at, a.nan_at)
    tcfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, accum_steps=a.accum, num_workers=a.workers,
                       log_every=1, ckpt_every=a.ckpt_every, seed=7,
                       precision="fp32")  # the equivalence tests compare losses to 1e-5: no bf16 rounding
    ocfg = OptimConfig(lr=1e-2, min_lr=1e-4, warmup_steps=3, weight_decay=0.05)
    res = train(method, NoisyPoints(), train_cfg=tcfg, optim_cfg=ocfg, run_dir=a.run, resume=a.resume, env=env)
    print(f"status={res.status} step={res.step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
