"""Training a visual tokenizer, every objective through one entry: :func:`train_tokenizer` (``beit tokenizer
train``, ``beit.train_tokenizer``) builds the run config of the objective (:func:`build_config`: ``gumbel``,
``vq`` or ``vqkd``) and runs its lifecycle task on the shared engine (:func:`beit.engine.run`).

The pixel objectives are engine methods: :class:`beit.tokenizers.gumbel.GumbelObjective` (DALL-E dVAE,
``model.quantizer=gumbel``) and :class:`beit.tokenizers.vq.VQObjective` (VQ-VAE, ``model.quantizer=vq``),
both subclasses of :class:`beit.tokenizers.base.TokenizerObjective`; :data:`OBJECTIVES` maps one to the other,
and :class:`PixelTokenizerTraining` is their run. VQ-KD (``vqkd``: a teacher's features, not pixels) has its
config and run in :mod:`.vqkd_train`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .. import engine, recipes
from ..config import ConfigError, OptimConfig, TrainConfig, resolve
from ..data.tokenizer import TokenizerDataConfig, build_dataset, resolve_data, training_datasets
from ..engine import DistEnv, Training, TrainResult
from ..models.tokenizer import Tokenizer, TokenizerConfig
from ..viz.curves import run_curves
from .base import ObjectiveConfig, TokenizerObjective, TokenizerTraining
from .gumbel import GumbelObjective
from .metrics import reconstruction_grid
from .vq import VQObjective
from .vqkd_train import VQKD_RUN_PRESETS, VQKDTrainConfig, VQKDTraining, build_vqkd_config

log = logging.getLogger("beit")


# --------------------------------------------------------------------------------------------- configs


@dataclass
class TokenizerTrainConfig:
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: TokenizerDataConfig = field(default_factory=TokenizerDataConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, min_lr=1e-5, weight_decay=0.0, warmup_fraction=0.02,
                                            clip_grad=1.0)
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=2000, batch_size=64, log_every=20,
                                                                    ckpt_every=500))


RUN_PRESETS: dict[str, dict] = recipes.TOKENIZER_RUNS  # the recipes live in beit.recipes (no torch)
OBJECTIVE_NAMES = ("gumbel", "vq", "vqkd")  # --objective: the quantizer trained (vqkd: distilled from a teacher)


def build_config(
    preset: str | None = "dvae_32",
    config: str | Path | None = None,
    overrides: list[str] | dict | None = None,
    *,
    objective: str | None = None,
    teacher: str | Path | None = None,
) -> TokenizerTrainConfig | VQKDTrainConfig:
    """The run config of ``objective`` (gumbel | vq | vqkd; None: the preset's): defaults <- run preset <- YAML
    file <- ``key=value`` overrides (e.g. ``model.vocab_size=1024``). A VQ-KD preset (``vqkd_32``) or
    ``objective="vqkd"`` gives a :class:`~beit.tokenizers.vqkd_train.VQKDTrainConfig`, whose ``vqkd.teacher`` is
    ``teacher`` if given; gumbel/vq set ``model.quantizer``."""
    if objective is not None and objective not in OBJECTIVE_NAMES:
        raise ConfigError(f"unknown tokenizer objective {objective!r}: choose one of {', '.join(OBJECTIVE_NAMES)}")
    if objective == "vqkd" or (objective is None and preset in VQKD_RUN_PRESETS):
        if preset and preset not in VQKD_RUN_PRESETS:
            raise ConfigError(f"preset {preset} is not a VQ-KD preset: give one of {', '.join(sorted(VQKD_RUN_PRESETS))}")
        return with_teacher(build_vqkd_config(preset, config, overrides), teacher)
    if objective is not None:
        overrides = ([*(overrides or []), f"model.quantizer={objective}"] if not isinstance(overrides, dict)
                     else {**overrides, "model.quantizer": objective})
    return with_teacher(resolve(TokenizerTrainConfig, RUN_PRESETS, preset, config, overrides), teacher)


def with_teacher(cfg, teacher: str | Path | None):
    """``cfg`` distilling ``teacher`` (``vqkd.teacher``) if one is given; only a VQ-KD run takes one."""
    if teacher is None:
        return cfg
    if not isinstance(cfg, VQKDTrainConfig):
        raise ConfigError("a teacher is for the vqkd objective (--objective vqkd)")
    cfg.vqkd.teacher = str(teacher)
    return cfg


# --------------------------------------------------------------------------------------------- methods


OBJECTIVES: dict[str, type[TokenizerObjective]] = {"gumbel": GumbelObjective, "vq": VQObjective}


def build_objective(tokenizer: Tokenizer, cfg: ObjectiveConfig | None = None) -> TokenizerObjective:
    """The engine method for this tokenizer's quantizer (``model.quantizer``: a key of :data:`OBJECTIVES`)."""
    return OBJECTIVES[tokenizer.cfg.quantizer](tokenizer, cfg)


# --------------------------------------------------------------------------------------------- the run


def _reconstructions(tok: Tokenizer, show: Dataset, path: Path) -> None:
    """Up to 8 images of ``show`` above their reconstructions through the tokenizer's code."""
    drawn = (show[i] for i in range(min(8, len(show))))  # type: ignore[arg-type]
    images = torch.stack([x for x in drawn if x is not None])  # None: a file that failed to decode
    reconstruction_grid(tok, images.to(next(tok.parameters()).device), path)


class PixelTokenizerTraining(TokenizerTraining):
    """A dVAE / VQ-VAE tokenizer run for :func:`beit.engine.run`: the tokenizer of ``model``, its objective
    (:data:`OBJECTIVES`), its reconstructions drawn at the end."""

    def build(self, cfg: TokenizerTrainConfig, env: DistEnv, out: Path, resume: bool) -> Training:
        mc = cfg.model
        dataset, val_ds = training_datasets(cfg, self.data, self.val)
        tok = Tokenizer(mc)
        if env.is_main:
            n_params = sum(p.numel() for p in tok.parameters())
            log.info("training a %s tokenizer (%.2fM parameters, %dpx -> %dx%d tokens, vocab %d) on %d images",
                     mc.quantizer, n_params / 1e6, mc.img_size, *mc.grid_size, mc.vocab_size, len(dataset))  # type: ignore[arg-type]
        return Training(build_objective(tok, cfg.objective), dataset, cfg, val_dataset=val_ds,
                        desc=f"tokenizer {mc.quantizer}")

    def outputs(self, training: Training, result: TrainResult) -> dict[str, Callable[[], Any]]:
        cfg, run_dir = training.cfg, Path(result.run_dir)
        show = training.val_dataset
        if show is None:
            show = build_dataset(self.data, cfg.model.img_size, train=False, limit=cfg.data.limit)
        return {"reconstructions.png": partial(_reconstructions, training.method.tokenizer, show,
                                               run_dir / "reconstructions.png"),
                "loss.png": run_curves(run_dir, "loss.png", ("loss", "recon", "psnr", "perplexity"),
                                       "tokenizer training")}


def train_tokenizer(
    data_dir: str | Path | Dataset | None = None,
    out_dir: str | Path = "runs/tokenizer",
    preset: str | None = "dvae_32",
    steps: int | None = None,
    overrides: list[str] | dict | None = None,
    *,
    objective: str | None = None,
    teacher: str | Path | None = None,
    config: str | Path | None = None,
    val_dir: str | Path | Dataset | None = None,
    resume: bool = False,
    max_minutes: float = 0.0,
    cfg: TokenizerTrainConfig | VQKDTrainConfig | None = None,
    resume_anyway: bool = False,
) -> Path:
    """Train a tokenizer of any objective with the shared engine; returns the run directory. The one entry of
    ``beit tokenizer train`` and ``beit.train_tokenizer``.

    ``cfg``, or the config :func:`build_config` makes of ``preset``/``config``/``overrides``/``objective``/
    ``teacher``, says which objective: gumbel / vq (:class:`PixelTokenizerTraining`) or vqkd
    (:class:`~beit.tokenizers.vqkd_train.VQKDTraining`, distilling ``vqkd.teacher``). Writes
    ``RUN/tokenizer.safetensors`` (load with :func:`beit.loading.load_tokenizer`), ``RUN/config.yaml``,
    ``RUN/metrics.jsonl``, ``RUN/loss.png``, ``RUN/checkpoints/`` (resume), for gumbel / vq
    ``RUN/reconstructions.png`` (originals above their reconstructions) and, with validation data,
    ``RUN/eval.json``. ``data_dir``/``val_dir`` override ``data.path``/``data.val_path``; ``steps`` overrides
    ``train.steps``.
    """
    cfg = build_config(preset, config, overrides, objective=objective) if cfg is None else cfg
    cfg = with_teacher(cfg, teacher)
    data, val = resolve_data(cfg, data_dir, val_dir, steps)
    task = VQKDTraining(data, val) if isinstance(cfg, VQKDTrainConfig) else PixelTokenizerTraining(data, val)
    res = engine.run(task, cfg, out_dir, resume=resume, max_minutes=max_minutes, resume_anyway=resume_anyway)
    return Path(res.run_dir)


__all__ = [
    "OBJECTIVES",
    "OBJECTIVE_NAMES",
    "RUN_PRESETS",
    "PixelTokenizerTraining",
    "TokenizerTrainConfig",
    "build_config",
    "build_objective",
    "train_tokenizer",
]
