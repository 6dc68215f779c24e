"""Self-supervised pretraining on a folder of unlabelled images: config, presets, and the run.

``beit pretrain --method beit|mae|ibot`` builds a :class:`PretrainConfig` (preset <- YAML <- overrides),
asks the method registry (:mod:`beit.methods`) for the method module and its per-sample transform, and
hands both to the one engine. Everything method-specific lives in the method's own config section.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, ModelConfig, OptimConfig, TrainConfig, dump_yaml, resolve
from ..data.folder import ImageFolder
from ..engine import TrainResult, seed_everything, setup_distributed, train
from ..methods.beit import BEiTConfig
from ..models.presets import PRESETS as MODEL_PRESETS

log = logging.getLogger("beit")


@dataclass
class DataConfig:
    path: str = ""  # a folder tree of images (labels, if any, are ignored)
    limit: int = 0  # use only the first N images in sorted order (0: all), for budgets and quick studies


@dataclass
class PretrainConfig:
    method: str = "beit"  # beit | mae | ibot
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tokenizer: str = ""  # path of a tokenizer run/dir (BEiT with target=tokens)
    tokenizer_preset: str = ""  # the tokenizer preset this recipe was designed with (documentation)
    beit: BEiTConfig = field(default_factory=BEiTConfig)


def _model(name: str, **changes) -> dict:
    return {**MODEL_PRESETS[name], **changes}


# Presets are named after their backbone. ``beit_base_patch16_224`` is the paper's ImageNet-1k recipe
# (Appendix B: batch 2000, lr 1.5e-3, 800 epochs, 10 warmup epochs, drop path 0.1, LayerScale 0.1,
# 75 of 196 patches masked, DALL-E tokenizer on 112 px views). The small ones are sized for a CPU.
PRESETS: dict[str, dict] = {
    "beit_base_patch16_224": {
        "model": _model("beit_base_patch16_224", drop_path_rate=0.1, layer_scale_init=0.1),
        "optim": {"lr": 1.5e-3, "min_lr": 1e-5, "weight_decay": 0.05, "warmup_fraction": 10 / 800,
                  "clip_grad": 3.0, "betas": [0.9, 0.999]},
        "train": {"epochs": 800, "batch_size": 2000, "precision": "bf16", "num_workers": 10},
        "beit": {"num_masked": 75},
        "tokenizer_preset": "dalle_112",
    },
    "beit_small_patch8_64": {
        "model": _model("beit_small_patch8_64", drop_path_rate=0.1, layer_scale_init=0.1),
        "optim": {"lr": 1.5e-3, "min_lr": 1e-5, "warmup_fraction": 0.05},
        "train": {"batch_size": 64, "precision": "bf16"},
        "tokenizer_preset": "dvae_64",
    },
    "beit_tiny_patch4_32": {
        "model": _model("beit_tiny_patch4_32", drop_path_rate=0.1, layer_scale_init=0.1),
        "optim": {"lr": 1.5e-3, "min_lr": 1e-5, "warmup_fraction": 0.05},
        "train": {"batch_size": 64, "precision": "bf16"},
        "tokenizer_preset": "dvae_32",
    },
}


def build_config(preset: str | None = None, config: str | None = None,
                 overrides: list[str] | dict | None = None) -> PretrainConfig:
    return resolve(PretrainConfig, PRESETS, preset, config, overrides)


def build_dataset(cfg: DataConfig, transform) -> ImageFolder:
    if not cfg.path:
        raise ConfigError("pretraining needs --data DIR (a folder of images)")
    ds = ImageFolder(cfg.path, transform=transform)
    if cfg.limit and cfg.limit < len(ds):
        ds.samples = ds.samples[: cfg.limit]
    return ds


def run(cfg: PretrainConfig, out: str | Path, *, resume: bool = False, max_minutes: float = 0.0) -> TrainResult:
    """Pretrain as ``cfg`` says into run directory ``out``."""
    from ..methods import build_method

    env = setup_distributed(cfg.train.device)
    seed_everything(cfg.train.seed)
    method, transform, cfg = build_method(cfg)
    dataset = build_dataset(cfg.data, transform)
    if env.is_main:
        log.info("pretraining %s (%s) on %d images from %s", cfg.method,
                 f"{cfg.model.embed_dim}w/{cfg.model.depth}d/{cfg.model.img_size}px", len(dataset), cfg.data.path)
    res = train(method, dataset, train_cfg=cfg.train, optim_cfg=cfg.optim, run_dir=out,
                config_yaml=dump_yaml(cfg), resume=resume, desc=f"pretrain {cfg.method}",
                max_minutes=max_minutes, env=env)
    if env.is_main:
        from ..viz.curves import plot_metrics

        plot_metrics(Path(out) / "metrics.jsonl", Path(out) / "loss.png",
                     keys=("loss", "mlm_acc", "acc", "lr"), title=f"{cfg.method} pretraining")
        masks_png = getattr(method, "save_mask_examples", None)
        if masks_png is not None:
            try:
                masks_png(dataset, Path(out) / "masks.png")
            except Exception as e:  # noqa: BLE001 - a picture must never lose a finished run
                log.warning("could not draw masks.png: %s", e)
    return res
