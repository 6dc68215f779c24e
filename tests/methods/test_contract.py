"""The Method contract, followed as docs/architecture.md's recipe "add a method" says, with no edit outside
this file: a toy method (predict each patch's mean colour from the backbone's patch tokens) registers itself,
then ``beit pretrain --method toy`` trains it, checkpoints, stops on SIGTERM, resumes exactly, and
``beit.load`` returns its backbone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as T

import beit
from beit import checkpoint as ckpt
from beit.cli import main
from beit.config import replace
from beit.loading import read_checkpoint
from beit.methods import registry
from beit.methods.base import Method, hooks
from beit.models.presets import preset_dict
from beit.models.vit import VisionTransformer

# --------------------------------------------------------------------------------------------- the method


@dataclass
class ToyConfig:
    """The method's config section: ``cfg.toy`` (``toy.*`` overrides)."""

    head_scale: float = 1.0
    sigterm_at: int = 0  # test only: send this process SIGTERM after this optimiser step (0: never)


class ToyMethod(Method):
    """``forward(images (B, 3, H, W)) -> (MSE of the patches' mean colours, {"loss"})``."""

    state_prefix = "backbone."  # what beit.load returns

    def __init__(self, backbone: VisionTransformer, cfg: ToyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.head = torch.nn.Linear(backbone.embed_dim, 3)
        self.patch = backbone.cfg.patch_size
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))  # resumes with the checkpoint

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens = self.backbone.forward_features(images)[:, 1:]  # (B, N, D)
        pred = self.head(tokens) * self.cfg.head_scale  # (B, N, 3)
        target = F.avg_pool2d(images, self.patch).flatten(2).transpose(1, 2)  # (B, N, 3), row-major patches
        loss = F.mse_loss(pred.float(), target.float())
        return loss, {"loss": loss.detach()}

    def after_step(self, step: int, total_steps: int) -> None:
        self.steps_seen.fill_(step)
        if step == self.cfg.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)


def build(cfg):
    """Registry builder: (method, per-sample transform, the config actually used)."""
    backbone = VisionTransformer(replace(cfg.model, num_classes=0, vocab_size=0))
    size = cfg.model.img_size
    transform = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToImage(), T.ToDtype(torch.float32, scale=True)])
    return ToyMethod(backbone, cfg.toy), transform, dataclasses.replace(cfg, model=backbone.cfg)


PRESETS = {
    "toy_tiny_patch4_16": {
        "model": preset_dict("beit_tiny_patch4_32", img_size=16, embed_dim=32, depth=2, num_heads=2),
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"batch_size": 4, "precision": "fp32", "num_workers": 0, "device": "cpu", "log_every": 1,
                  "ckpt_every": 3},
    },
}


@pytest.fixture
def toy_registered():
    """``register("toy", ...)`` as the method's own module would, undone afterwards so the other tests
    (the CLI reference, the preset lists) see only the built-in methods."""
    spec = registry.register("toy", build, config=ToyConfig, presets=PRESETS, default_preset="toy_tiny_patch4_16")
    yield spec
    registry.unregister("toy")


# --------------------------------------------------------------------------------------------- the tests


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_hooks_default_and_declared():
    h = hooks(ToyMethod(VisionTransformer(beit.ModelConfig(img_size=8, patch_size=4, embed_dim=8, depth=1,
                                                           num_heads=1)), ToyConfig()))
    assert h.state_prefix == "backbone." and h.backbones == {} and h.best_metric is None
    assert h.evaluate(None) == {} and not h.find_unused_parameters
    plain = hooks(torch.nn.Linear(2, 2))  # a plain module gets every default
    assert plain.state_prefix == "model." and plain.after_step(1, 2) is None
    assert {g["weight_decay"] for g in plain.param_groups(beit.config.OptimConfig(weight_decay=0.1))} == {0.0, 0.1}


def test_toy_method_trains_checkpoints_resumes_and_loads(tmp_path, make_image_folder, toy_registered, capsys):
    data = make_image_folder(classes=(), per_class=16, size=16)
    from beit.tasks import pretrain

    assert "toy" in registry.methods() and "toy" in {f.name for f in dataclasses.fields(pretrain.config_class())}
    assert pretrain.build_config().toy == ToyConfig()  # the config section joined PretrainConfig

    base = ["-q", "pretrain", "--data", str(data), "--method", "toy", "--steps", "8", "--json"]  # default preset: the toy's
    assert main([*base, "--out", str(tmp_path / "full")]) == 0
    assert main([*base, "--out", str(tmp_path / "cut"), "toy.sigterm_at=5"]) == 143  # 128 + SIGTERM (issue 26)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "interrupted"
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step_00000005"
    # the same config as the interrupted run (a resume that changes it is refused); step 5 is not met again
    assert main([*base, "--out", str(tmp_path / "cut"), "--resume", "toy.sigterm_at=5"]) == 0

    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert sorted(full) == sorted(cut) == list(range(1, 9))
    assert all(full[s] == cut[s] for s in full), [(s, full[s], cut[s]) for s in full]
    assert sum(list(full.values())[-3:]) < sum(list(full.values())[:3])  # it learns

    weights, state, _ = read_checkpoint(ckpt.latest_checkpoint(tmp_path / "cut"))
    assert int(weights["steps_seen"]) == 8 and state["state_prefix"] == "backbone."
    model = beit.load(tmp_path / "cut")
    assert isinstance(model, VisionTransformer) and model.cfg.img_size == 16 and model.cfg.depth == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[f"backbone.{k}"]), k


def test_unknown_method_lists_the_registered_ones(tmp_path, toy_registered, capsys):
    rc = main(["-q", "pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "method=nope"])
    err = capsys.readouterr().err
    assert rc == 2 and "nope" in err and "toy" in err and "beit" in err
