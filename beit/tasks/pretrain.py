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
from ..methods.ibot import IBOTConfig
from ..methods.mae import MAEConfig
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
    mae: MAEConfig = field(default_factory=MAEConfig)
    ibot: IBOTConfig = field(default_factory=IBOTConfig)


def _model(name: str, **changes) -> dict:
    return {**MODEL_PRESETS[name], **changes}


_MAE_VIT = dict(use_sincos_pos_emb=True, use_abs_pos_emb=False, use_shared_rel_pos_bias=False,
                layer_scale_init=0.0, drop_path_rate=0.0)
_IBOT_VIT = dict(use_abs_pos_emb=True, use_shared_rel_pos_bias=False, layer_scale_init=0.0, drop_path_rate=0.1,
                 use_mask_token=True)  # MAE and iBOT presets are named method_size_patchP_res


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
        "tokenizer_preset": "vq_32",
    },
    # MAE (arXiv 2111.06377, Appendix A.1; official main_pretrain.py): encoder with fixed sin-cos positions,
    # no relative bias, no LayerScale, no drop path; AdamW betas (0.9, 0.95), blr 1.5e-4 x 4096/256 = 2.4e-3,
    # wd 0.05, 800 epochs with 40 warmup, no gradient clipping; 75% masking, decoder 512w/8d/16h.
    "mae_base_patch16_224": {
        "method": "mae",
        "model": _model("beit_base_patch16_224", **_MAE_VIT),
        "optim": {"lr": 2.4e-3, "min_lr": 0.0, "weight_decay": 0.05, "warmup_fraction": 40 / 800,
                  "clip_grad": 0.0, "betas": [0.9, 0.95]},
        "train": {"epochs": 800, "batch_size": 4096, "precision": "bf16", "num_workers": 10},
    },
    # CPU-sized: a 128-wide, 2-block decoder; the lr is raised as in the other tiny presets (short runs).
    "mae_tiny_patch4_32": {
        "method": "mae",
        "model": _model("beit_tiny_patch4_32", **_MAE_VIT),
        "optim": {"lr": 1.5e-3, "min_lr": 1e-5, "weight_decay": 0.05, "warmup_fraction": 0.05, "clip_grad": 0.0,
                  "betas": [0.9, 0.95]},
        "train": {"batch_size": 64, "precision": "bf16"},
        "mae": {"decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4},
    },
    # iBOT (arXiv 2111.07832; official main_ibot.py and the released commands): ViT with learned absolute
    # positions, no relative bias, no LayerScale, drop path 0.1 (student); lr 5e-4 x batch/256, min 1e-6,
    # 10 warmup epochs, wd 0.04 (constant here; the recipe ramps it to 0.4), clip 3; 2 global crops (0.25-1)
    # + 10 local 96 px crops (0.05-0.25), shared head with 8192 prototypes, teacher temperatures
    # 0.04 -> 0.07 over 30 epochs, momentum 0.996 -> 1, masking ratio 0 or U(0.1, 0.5) per crop.
    "ibot_base_patch16_224": {
        "method": "ibot",
        "model": _model("beit_base_patch16_224", **_IBOT_VIT),
        "optim": {"lr": 5e-4 * 1024 / 256, "min_lr": 1e-6, "weight_decay": 0.04, "warmup_fraction": 10 / 400,
                  "clip_grad": 3.0, "betas": [0.9, 0.999]},
        "train": {"epochs": 400, "batch_size": 1024, "precision": "bf16", "num_workers": 10},
        "ibot": {"local_crops": 10, "local_crop_size": 96, "global_crop_scale": [0.25, 1.0],
                 "local_crop_scale": [0.05, 0.25], "teacher_temp_warmup": 30 / 400, "freeze_last_layer": 1 / 400},
    },
    # CPU-sized: 1024 prototypes and a 512-wide head (8192 x 2048 would dwarf the tiny backbone), no local
    # crops, temperatures warmed up over the first 10% of the run.
    "ibot_tiny_patch4_32": {
        "method": "ibot",
        "model": _model("beit_tiny_patch4_32", **_IBOT_VIT),
        "optim": {"lr": 5e-4, "min_lr": 1e-6, "weight_decay": 0.04, "warmup_fraction": 0.05, "clip_grad": 3.0},
        "train": {"batch_size": 64, "precision": "bf16"},
        "ibot": {"out_dim": 1024, "hidden_dim": 512, "bottleneck_dim": 128, "teacher_temp_warmup": 0.1,
                 "local_crop_size": 16},
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
    from ..methods.registry import build_method

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
        from ..viz.masks import save_mask_grid

        try:
            save_mask_grid(dataset, Path(out) / "masks.png")
        except Exception as e:  # noqa: BLE001 - a picture must never lose a finished run
            log.warning("could not draw masks.png: %s", e)
    return res
