"""Training a visual tokenizer: the run config, presets, data, and the run on the shared engine.

The objectives are engine methods: :class:`beit.tokenizers.gumbel.GumbelObjective` (DALL-E dVAE,
``model.quantizer=gumbel``) and :class:`beit.tokenizers.vq.VQObjective` (VQ-VAE, ``model.quantizer=vq``),
both subclasses of :class:`beit.tokenizers.base.TokenizerObjective`; :data:`OBJECTIVES` maps one to the other.

Plain functions for the CLI: :func:`train_tokenizer`, :func:`build_config`, and
:func:`beit.tokenizers.evaluate.evaluate_cmd`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .. import recipes
from ..config import ConfigError, OptimConfig, TrainConfig, check_fields, dump_yaml, resolve
from ..data.tokenizer import build_dataset, image_transform
from ..engine import finish_run, start_run, train
from ..models.tokenizer import Tokenizer, TokenizerConfig, save_tokenizer
from ..viz.curves import run_curves
from .base import ObjectiveConfig, TokenizerObjective
from .gumbel import GumbelObjective
from .metrics import evaluate_tokenizer, reconstruction_grid
from .vq import VQObjective

log = logging.getLogger("beit")


# --------------------------------------------------------------------------------------------- configs


@dataclass
class TokenizerDataConfig:
    path: str = ""  # a folder tree of images (labels, if any, are ignored)
    val_path: str = ""  # optional held-out folder: evaluated (psnr, codebook usage) each epoch and at the end
    limit: int = 0  # use only the first N images in sorted order (0: all)
    val_limit: int = 0
    hflip: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "data", {"limit val_limit": "count"})


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

def build_config(
    preset: str | None = "dvae_32",
    config: str | Path | None = None,
    overrides: list[str] | dict | None = None,
) -> TokenizerTrainConfig:
    """defaults <- run preset <- YAML file <- ``key=value`` overrides (e.g. ``model.vocab_size=1024``)."""
    return resolve(TokenizerTrainConfig, RUN_PRESETS, preset, config, overrides)


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


def resolve_data(cfg, data_dir: str | Path | Dataset | None, val_dir: str | Path | Dataset | None,
                 steps: int | None) -> tuple[str | Path | Dataset, str | Path | Dataset | None]:
    """The run's training and held-out images (every tokenizer objective's run): ``data_dir``/``val_dir``
    (folders or datasets) over ``data.path``/``data.val_path``, ``steps`` over ``train.steps``; folder paths are
    written back into ``cfg`` so that its ``config.yaml`` says what ran."""
    if steps is not None:
        cfg.train.steps = int(steps)
    data: str | Path | Dataset = data_dir if data_dir is not None else cfg.data.path
    if isinstance(data, (str, Path)):
        if not str(data):
            raise ConfigError("tokenizer training needs data: a folder of images (data.path / --data)")
        cfg.data.path = str(data)
    val: str | Path | Dataset | None = val_dir if val_dir is not None else (cfg.data.val_path or None)
    if isinstance(val, (str, Path)):
        cfg.data.val_path = str(val)
    return data, val


def training_datasets(cfg, data, val) -> tuple[Dataset, Dataset | None]:
    """The augmented training set and the plain held-out set at the tokenizer's input size."""
    size = cfg.model.img_size
    dataset = build_dataset(data, size, train=True, hflip=cfg.data.hflip, limit=cfg.data.limit)
    val_ds = build_dataset(val, size, train=False, limit=cfg.data.val_limit) if val is not None else None
    return dataset, val_ds


def save_run(env, tok, res, val_ds: Dataset | None, evaluate) -> Path:
    """Rank 0 writes the trained tokenizer and, with held-out data, ``eval.json`` (the last evaluation, or
    ``evaluate(val_ds)``); returns the run folder."""
    run_dir = Path(res.run_dir)
    if env.is_main:
        tok.eval()
        save_tokenizer(tok, run_dir)
        if val_ds is not None:
            ev = res.last_eval or evaluate(val_ds)
            (run_dir / "eval.json").write_text(json.dumps({"step": res.step, **ev}, indent=2) + "\n")
    return run_dir


def train_tokenizer(
    data_dir: str | Path | Dataset | None = None,
    out_dir: str | Path = "runs/tokenizer",
    preset: str | None = "dvae_32",
    steps: int | None = None,
    overrides: list[str] | dict | None = None,
    *,
    config: str | Path | None = None,
    val_dir: str | Path | Dataset | None = None,
    resume: bool = False,
    max_minutes: float = 0.0,
    cfg: TokenizerTrainConfig | None = None,
    resume_anyway: bool = False,
) -> Path:
    """Train a tokenizer with the shared engine; returns the run directory.

    Writes ``RUN/tokenizer.safetensors`` (load with :func:`beit.loading.load_tokenizer`),
    ``RUN/config.yaml``, ``RUN/metrics.jsonl``, ``RUN/reconstructions.png`` (originals above their
    reconstructions), ``RUN/checkpoints/`` (resume) and, with validation data, ``RUN/eval.json``.
    ``data_dir``/``val_dir`` override ``data.path``/``data.val_path``; ``steps`` overrides ``train.steps``.
    """
    if cfg is None:
        cfg = build_config(preset, config, overrides)
    data, val = resolve_data(cfg, data_dir, val_dir, steps)
    env = start_run(cfg.train)
    mc = cfg.model
    dataset, val_ds = training_datasets(cfg, data, val)
    tok = Tokenizer(mc)
    method = build_objective(tok, cfg.objective)
    if env.is_main:
        n_params = sum(p.numel() for p in tok.parameters())
        log.info("training a %s tokenizer (%.2fM parameters, %dpx -> %dx%d tokens, vocab %d) on %d images",
                 mc.quantizer, n_params / 1e6, mc.img_size, *mc.grid_size, mc.vocab_size, len(dataset))  # type: ignore[arg-type]
    res = train(method, dataset, train_cfg=cfg.train, optim_cfg=cfg.optim, run_dir=out_dir,
                config_yaml=dump_yaml(cfg), resume=resume, val_dataset=val_ds, desc=f"tokenizer {mc.quantizer}",
                max_minutes=max_minutes, env=env, resume_anyway=resume_anyway)
    run_dir = save_run(env, tok, res, val_ds, partial(evaluate_tokenizer, tok))
    show = val_ds if val_ds is not None else build_dataset(data, mc.img_size, train=False, limit=cfg.data.limit)
    finish_run(env, {"reconstructions.png": partial(_reconstructions, tok, show, run_dir / "reconstructions.png"),
                     "loss.png": run_curves(run_dir, "loss.png", ("loss", "recon", "psnr", "perplexity"),
                                            "tokenizer training")}, res)
    return run_dir


__all__ = [
    "OBJECTIVES",
    "RUN_PRESETS",
    "TokenizerDataConfig",
    "TokenizerTrainConfig",
    "build_config",
    "build_dataset",
    "resolve_data",
    "save_run",
    "training_datasets",
    "build_objective",
    "image_transform",
    "train_tokenizer",
]
