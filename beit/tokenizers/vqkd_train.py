"""Training a VQ-KD tokenizer (``beit tokenizer train --objective vqkd --teacher PATH``, through the one entry
:func:`beit.tokenizers.train.train_tokenizer`) on the shared engine.

The run config (:class:`VQKDTrainConfig`) has the sections of every tokenizer run (``model``, ``data``,
``optim``, ``train``) with a VQ-KD ``model`` (:class:`beit.models.vqkd.VQKDConfig`) and a ``vqkd`` section
(teacher, teacher block and precision, codebook EMA). The run writes what a tokenizer run writes:
``RUN/tokenizer.safetensors`` (``beit.load`` / ``--tokenizer`` read it), ``config.yaml``, ``metrics.jsonl``,
``checkpoints/``, ``loss.png`` and, with validation images, ``eval.json`` (codebook usage, perplexity,
teacher cosine).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from .. import recipes
from ..config import ConfigError, OptimConfig, TrainConfig, replace, resolve
from ..data.tokenizer import TokenizerDataConfig, build_dataset, training_datasets
from ..engine import DistEnv, Training, TrainResult
from ..loading import load_tokenizer
from ..models.vqkd import VQKDConfig, VQKDTokenizer
from ..viz.curves import run_curves
from .base import TokenizerTraining
from .vqkd import Teacher, VQKDObjective, VQKDObjectiveConfig, evaluate_vqkd

__all__ = ["VQKD_RUN_PRESETS", "VQKDTrainConfig", "VQKDTraining", "build_vqkd_config", "evaluate_vqkd_cmd"]

log = logging.getLogger("beit")


@dataclass
class VQKDTrainConfig:
    model: VQKDConfig = field(default_factory=VQKDConfig)
    vqkd: VQKDObjectiveConfig = field(default_factory=VQKDObjectiveConfig)
    data: TokenizerDataConfig = field(default_factory=TokenizerDataConfig)
    # the official recipe's AdamW (run_vqkd_training.py): betas (0.9, 0.99), weight decay 1e-4, min lr 1e-5
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=5e-4, min_lr=1e-5, weight_decay=1e-4, betas=(0.9, 0.99),
                                            warmup_fraction=0.05, clip_grad=3.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=2000, batch_size=64, log_every=20,
                                                                    ckpt_every=500))


# A run preset = the architecture of the same name + training defaults sized for it. vqkd_224 is the paper's
# recipe (100 epochs on ImageNet-1k at batch 512, lr 5e-5 per 128 images, 10 warmup epochs); vqkd_32's lr is a
# CPU-sized guess that scripts/vqkd_study.sh is there to settle.
VQKD_RUN_PRESETS: dict[str, dict] = recipes.VQKD_RUNS  # the recipes live in beit.recipes (no torch)


def build_vqkd_config(preset: str | None = "vqkd_32", config: str | Path | None = None,
                      overrides: list[str] | dict | None = None) -> VQKDTrainConfig:
    """defaults <- run preset <- YAML file <- ``key=value`` overrides (e.g. ``vqkd.teacher_block=3``)."""
    return resolve(VQKDTrainConfig, VQKD_RUN_PRESETS, preset, config, overrides)


class VQKDTraining(TokenizerTraining):
    """A VQ-KD tokenizer run for :func:`beit.engine.run` (through :func:`beit.tokenizers.train.train_tokenizer`):
    the frozen teacher, the tokenizer sized to its features, the objective."""

    def build(self, cfg: VQKDTrainConfig, env: DistEnv, out: Path, resume: bool) -> Training:
        vq = cfg.vqkd
        tch = Teacher.load(vq.teacher, vq.teacher_block, vq.teacher_precision, vq.teacher_mean, vq.teacher_std)
        if cfg.model.target_dim == 0:  # the decoder reconstructs the teacher's feature width
            cfg.model = replace(cfg.model, target_dim=tch.dim)
        mc = cfg.model
        dataset, val_ds = training_datasets(cfg, self.data, self.val)
        tok = VQKDTokenizer(mc)
        if env.is_main:
            log.info("training a VQ-KD tokenizer (%.2fM parameters, %dpx -> %dx%d tokens, vocab %d x %d) from a "
                     "%d-block teacher (block %d, %s, %dpx) on %d images",
                     sum(p.numel() for p in tok.parameters()) / 1e6, mc.img_size, *mc.grid_size, mc.vocab_size,
                     mc.embed_dim, len(tch.model.blocks), tch.block, vq.teacher_precision,
                     tch.model.patch_embed.img_hw[0], len(dataset))  # type: ignore[arg-type]
        return Training(VQKDObjective(tok, tch, vq), dataset, cfg, val_dataset=val_ds, desc="tokenizer vqkd")

    def outputs(self, training: Training, result: TrainResult) -> dict[str, Callable[[], Any]]:
        return {"loss.png": run_curves(result.run_dir, "loss.png", ("loss", "rec", "teacher_cos", "perplexity"),
                                       "VQ-KD tokenizer training")}


def evaluate_vqkd_cmd(tokenizer: str | Path, data_dir: str | Path, *, teacher: str | None = None, limit: int = 0,
                      batch_size: int = 128, device: str = "cpu") -> dict[str, float]:
    """``beit tokenizer eval`` for a VQ-KD tokenizer: its teacher is ``teacher`` or the one its run recorded."""
    tok = load_tokenizer(tokenizer, device=device)
    if not isinstance(tok, VQKDTokenizer):
        raise ConfigError(f"{tokenizer} is not a VQ-KD tokenizer")
    vq = VQKDObjectiveConfig()
    run_cfg = Path(tokenizer) / "config.yaml"
    if run_cfg.is_file():  # a training run: its own teacher settings
        vq = build_vqkd_config(None, run_cfg).vqkd
    if teacher:
        vq.teacher = str(teacher)
    if not vq.teacher:
        raise ConfigError(f"{tokenizer}: no teacher recorded with this tokenizer; pass --teacher PATH")
    tch = Teacher.load(vq.teacher, vq.teacher_block, vq.teacher_precision, vq.teacher_mean, vq.teacher_std)
    ds = build_dataset(data_dir, tok.cfg.img_size, train=False, limit=limit)
    res = evaluate_vqkd(tok, tch, DataLoader(ds, batch_size=batch_size, shuffle=False))
    return {**res, "teacher": vq.teacher}
