"""docs/architecture.md's recipe "add a downstream task", followed in this file alone: a toy task (is the
image brighter than mid-grey?) with its config, presets, ``Method`` subclass, ``TrainingTask`` and ``run``
(one call of ``beit.engine.run``), and its command
group, which trains through ``beit toy``, keeps a best checkpoint, draws its curves, starts a second run from
the first one's backbone and loads through ``beit.load``. The one edit outside a task's own files, adding
the command group to ``beit.cli.COMMAND_GROUPS``, is done here by passing ``groups=`` to ``main``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2 as T

import beit
from beit import engine
from beit.cli import COMMAND_GROUPS, build_parser, main
from beit.cli.common import add_train_flags
from beit.cli.finetune import train_task
from beit.config import ModelConfig, OptimConfig, TrainConfig, replace, resolve
from beit.data.folder import ImageFolder
from beit.engine import DistEnv, Training, TrainingTask, TrainResult
from beit.loading import adopt_architecture, build_backbone, resumed_model_config
from beit.methods.base import Method
from beit.models.presets import preset_dict
from beit.models.vit import VisionTransformer
from beit.runs import RunDir
from beit.viz.curves import run_curves

# --------------------------------------------------------------------------------------------- beit/tasks/toy.py


@dataclass
class ToyDataConfig:
    path: str = ""  # DIR with train/<class>/ and val/<class>/ (the class folders are not the target)


@dataclass
class ToyTaskConfig:
    init: str = ""  # a backbone beit.load reads, or "none"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


PRESETS = {
    "toy_tiny_patch4_16": {
        "model": preset_dict("beit_tiny_patch4_32", img_size=16, embed_dim=32, depth=2, num_heads=2),
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"batch_size": 4, "precision": "fp32", "num_workers": 0, "device": "cpu", "log_every": 1},
    },
}


def build_config(preset: str | None = None, config: str | None = None, overrides=None) -> ToyTaskConfig:
    return resolve(ToyTaskConfig, PRESETS, preset, config, overrides)


class BrightnessTask(Method):
    """``batch = (images (B, 3, H, W) in [0, 1], labels)`` -> CE of "mean pixel > 0.5" from pooled patches."""

    best_metric = "acc"
    state_prefix = "model."

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        self.model = model
        self.head = nn.Linear(model.embed_dim, 2)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.forward_features(images)[:, 1:].mean(1))  # (B, 2)

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch[0]
        loss = F.cross_entropy(self.logits(images), (images.mean((1, 2, 3)) > 0.5).long())
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self, loader) -> dict[str, float]:
        hit = n = 0
        for images, _ in loader:
            target = (images.mean((1, 2, 3)) > 0.5).long()
            hit, n = hit + int((self.logits(images).argmax(-1) == target).sum()), n + len(target)
        return {"acc": 100.0 * hit / max(n, 1)}


class ToyTraining(TrainingTask):
    def build(self, cfg: ToyTaskConfig, env: DistEnv, out: Path, resume: bool) -> Training:
        size = cfg.model.img_size
        tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToImage(), T.ToDtype(torch.float32, scale=True)])
        tr = ImageFolder(Path(cfg.data.path) / "train", transform=tf, with_labels=True)
        va = ImageFolder(Path(cfg.data.path) / "val", transform=tf, with_labels=True)
        saved = resumed_model_config(out, resume)
        mcfg = saved if saved is not None else adopt_architecture(cfg.model, cfg.init)
        model = build_backbone(cfg.init if saved is None else "", replace(mcfg, num_classes=0, vocab_size=0))
        cfg = dataclasses.replace(cfg, model=model.cfg)
        return Training(BrightnessTask(model), tr, cfg, val_dataset=va, desc="toy")

    def outputs(self, training: Training, result: TrainResult) -> dict:
        return {"curves.png": run_curves(result.run_dir, "curves.png", ("loss", "val_acc"), "toy task")}


def run(cfg: ToyTaskConfig, out: str | Path, *, resume: bool = False, max_minutes: float = 0.0,
        resume_anyway: bool = False) -> TrainResult:
    return engine.run(ToyTraining(), cfg, out, resume=resume, max_minutes=max_minutes, resume_anyway=resume_anyway)


# --------------------------------------------------------------------------------------------- beit/cli/toy.py


def cmd_toy(args: argparse.Namespace) -> int:
    return train_task(sys.modules[__name__], args, {})


def add_commands(sub) -> None:
    p = sub.add_parser("toy", help="a toy task: is the image brighter than mid-grey?")
    p.add_argument("--data", required=True, help="folder with train/<class>/ and val/<class>/")
    p.add_argument("--init", required=True, metavar="CKPT|none", help="backbone to start from, or 'none'")
    p.add_argument("--out", required=True, help="run directory")
    add_train_flags(p, sorted(PRESETS))
    p.set_defaults(func=cmd_toy)


# --------------------------------------------------------------------------------------------- the test


def test_toy_task_trains_through_its_command(tmp_path, make_image_folder, capsys):
    data = tmp_path / "data"
    make_image_folder(data / "train", per_class=6, size=16, seed=0)
    make_image_folder(data / "val", per_class=2, size=16, seed=1)
    groups = (*COMMAND_GROUPS, sys.modules[__name__])
    base = ["-q", "toy", "--data", str(data), "--preset", "toy_tiny_patch4_16", "--steps", "6", "--json"]

    assert main([*base, "--init", "none", "--out", str(tmp_path / "first")], groups=groups) == 0
    first = RunDir(tmp_path / "first")
    assert (first.checkpoints_path / "best" / "model.safetensors").is_file()
    rows = [json.loads(ln) for ln in first.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in rows if "val_acc" in r] == [3, 6]  # each epoch: 12 images / batch 4
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["best"]["acc"] >= 0
    assert (first.path / "curves.png").is_file()
    backbone = beit.load(first.path)
    assert isinstance(backbone, VisionTransformer) and backbone.cfg.depth == 2

    # a second run starts from the first one's backbone, whose architecture wins over the preset's
    second = tmp_path / "second"
    assert main([*base, "--init", str(first.path), "--out", str(second), "--steps", "1", "model.depth=1"],
                groups=groups) == 0
    assert RunDir(second).config()["model"]["depth"] == 2
    with pytest.raises(SystemExit):  # not a built-in command
        build_parser().parse_args(base[1:])
