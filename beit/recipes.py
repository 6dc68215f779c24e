"""Every built-in preset as plain data: backbones, tokenizers, pretraining, fine-tuning and segmentation recipes.

Kept apart from the modules that build models (all of which import torch) so that ``beit presets``, ``beit --help``
and the ``--preset`` lists read them without importing torch (a second of start-up on a fast machine, many on a
busy one). The modules that use a kind re-export it under their former name (``beit.models.presets.PRESETS``,
``beit.tasks.finetune.PRESETS``, ``beit.methods.mae.PRESETS``...); a method registered by a plugin brings its own
presets to :mod:`beit.methods.registry`.
"""

from __future__ import annotations

from typing import Any

from .config import ModelConfig, from_dict, image_hw

__all__ = ["CAMVID_CLASSES", "DEMO_DEFAULT_METHOD", "DEMO_METHODS", "FINETUNE", "MODELS", "PRETRAIN",
           "PRETRAIN_DEFAULTS", "SEGMENT", "TOKENIZERS", "TOKENIZER_RUNS", "VQKD_RUNS", "VQKD_TOKENIZERS", "image_hw_of",
           "parameter_count", "preset_dict"]

# --------------------------------------------------------------------------------------------- backbones

MODELS: dict[str, dict[str, Any]] = {
    "beit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3),
    "beit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6),
    "beit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
    # BEiT-large: LayerScale starts at 1e-5 (Appendix B), as in the official and timm configs.
    "beit_large_patch16_224": dict(embed_dim=1024, depth=24, num_heads=16, layer_scale_init=1e-5),
    # CPU-sized: 32px images in 4px patches give an 8x8 grid (64 tokens), the token count of a 128px
    # image in 16px patches. ViT-Tiny width with half its depth: on two CPU cores a 12-layer model sees
    # only ~500 steps of 64 images in 30 minutes (measured ~17 images/s in bf16), too few to learn much;
    # 6 layers double that. Pass depth=12 for the full ViT-Tiny.
    "beit_tiny_patch4_32": dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3),
    "beit_small_patch8_64": dict(img_size=64, patch_size=8, embed_dim=384, depth=12, num_heads=6),
}


def preset_dict(name: str, **changes: Any) -> dict[str, Any]:
    """The config dict of backbone ``name`` with ``changes``: the ``model`` section of recipe presets."""
    return {**MODELS[name], **changes}


# --------------------------------------------------------------------------------------------- tokenizers

# The small presets are sized for CPU training (docs/tokenizer.md has the measurements):
# 4x4 pixels per token on 32px images; widths 64/128/256 keep a training step on 2 cores well under a second.
# Each is the keyword arguments of beit.models.tokenizer.TokenizerConfig (unset keys keep its defaults).
_VQ_32 = dict(img_size=32, vocab_size=512, n_hid=64, n_groups=3, n_blk_per_group=1, n_init=128, quantizer="vq",
              embed_dim=64)
TOKENIZERS: dict[str, dict[str, Any]] = {
    # CIFAR-10 scale: 32px -> 8x8 tokens
    "dvae_32": dict(img_size=32, vocab_size=512, n_hid=64, n_groups=3, n_blk_per_group=1, n_init=128),
    "vq_32": _VQ_32,
    # vq_32 at half the width: 3x fewer encode FLOPs (0.035 vs 0.106 GFLOP per image; the frozen encode runs on
    # every BEiT step). At the hour on CIFAR-10: BEiT fine-tunes as well as with vq_32 (docs/notebook/2026-11-cifar10-hour.md, 8.3)
    "vq_32_small": {**_VQ_32, "n_hid": 32},
    # 64px -> 8x8 tokens (8x8 pixels per token, like DALL-E)
    "dvae_64": dict(img_size=64, vocab_size=1024, n_hid=64, n_groups=4, n_blk_per_group=1, n_init=128),
    # The DALL-E architecture: 112px -> 14x14 tokens, the tokenizer input of BEiT at 224px
    "dalle_112": dict(img_size=112, vocab_size=8192, n_hid=256, n_groups=4, n_blk_per_group=2, n_init=128),
}


def _run_preset(name: str, **extra: Any) -> dict:
    return {"model": dict(TOKENIZERS[name]), **extra}


_VQ_TRAINING = {"objective": {"recon": "mse"}, "optim": {"lr": 2e-3}}  # the VQ presets' training defaults

# A run preset = the tokenizer architecture of the same name + training defaults sized for it.
TOKENIZER_RUNS: dict[str, dict] = {
    "dvae_32": _run_preset("dvae_32"),
    # measured on CIFAR-10 (docs/notebook/2026-11-cifar10-tokenizer.md): 23.3 dB test PSNR, 99.6% of the codes in use after 20 minutes
    # on 2 CPU cores; MSE reconstruction and a higher lr than the dVAE default get there fastest
    "vq_32": _run_preset("vq_32", **_VQ_TRAINING),
    # the tiny BEiT preset's tokenizer: 3x fewer encode FLOPs, same BEiT fine-tuning (docs/notebook/2026-11-cifar10-hour.md, 8.3)
    "vq_32_small": _run_preset("vq_32_small", **_VQ_TRAINING),
    "dvae_64": _run_preset("dvae_64"),
    "dalle_112": _run_preset(
        "dalle_112",
        optim={"lr": 1e-4, "min_lr": 1.25e-6, "weight_decay": 1e-4},  # DALL-E Appendix A.2
        objective={"kl_weight": 6.6, "tau_anneal_fraction": 0.05, "kl_warmup_fraction": 0.01},
        train={"batch_size": 512},
    ),
}

# BEiT v2's semantic tokenizers (VQ-KD, beit.models.vqkd.VQKDConfig): the paper's 8192 x 32 codebook at 224 px,
# a 1024-entry one for 32 px images; encoder/decoder widths follow the backbone they distil.
VQKD_TOKENIZERS: dict[str, dict[str, Any]] = {
    "vqkd_32": dict(img_size=32, patch_size=4, vocab_size=1024, embed_dim=32, encoder_dim=192, encoder_depth=4,
                    encoder_heads=3, decoder_dim=192, decoder_depth=1, decoder_heads=3),
    "vqkd_224": dict(img_size=224, patch_size=16, vocab_size=8192, embed_dim=32, encoder_dim=768, encoder_depth=12,
                     encoder_heads=12, decoder_dim=768, decoder_depth=1, decoder_heads=12),
}
VQKD_RUNS: dict[str, dict] = {
    "vqkd_32": {"model": dict(VQKD_TOKENIZERS["vqkd_32"])},
    "vqkd_224": {"model": dict(VQKD_TOKENIZERS["vqkd_224"]), "optim": {"lr": 2e-4, "warmup_fraction": 0.1},
                 "train": {"epochs": 100, "batch_size": 512, "num_workers": 10}},
}


# --------------------------------------------------------------------------------------------- pretraining

# Presets are named after their backbone. ``beit_base_patch16_224`` is the paper's ImageNet-1k recipe
# (Appendix B: batch 2000, lr 1.5e-3, 800 epochs, 10 warmup epochs, drop path 0.1, LayerScale 0.1,
# 75 of 196 patches masked, DALL-E tokenizer on 112 px views). The small ones are sized for a CPU.
_BEIT: dict[str, dict] = {
    "beit_base_patch16_224": {
        "model": preset_dict("beit_base_patch16_224", drop_path_rate=0.1, layer_scale_init=0.1),
        "optim": {"lr": 1.5e-3, "min_lr": 1e-5, "weight_decay": 0.05, "warmup_fraction": 10 / 800,
                  "clip_grad": 3.0, "betas": [0.9, 0.999]},
        "train": {"epochs": 800, "batch_size": 2000, "num_workers": 10},
        "beit": {"num_masked": 75},
        "tokenizer_preset": "dalle_112",
    },
    # The small presets mask uniformly at random: on their 8x8 grid the paper's blocks (>= 16 patches) hide a
    # quarter of the image at once and most masked tokens have no visible neighbour (on ImageNet's 14x14 grid a
    # block is small). Measured on CIFAR-10 (docs/notebook/2026-11-cifar10-hour.md, 8.4-8.5): after the same hour of pretraining,
    # fine-tuned 51.9% with random masking vs 47.9% blockwise (scratch 44.2%; random masking over three label
    # draws: 52.9% vs scratch 44.6%). The tiny preset also crops its views
    # from (0.35, 1) of the image, not (0.08, 1): 8% of a 32 px image is a 9 px patch blown up (with the cheaper
    # tokenizer, online kNN 31.0 vs 27.6 at the hour, fine-tuned the same: docs/notebook/2026-11-cifar10-hour.md, 8.3).
    "beit_small_patch8_64": {
        "model": preset_dict("beit_small_patch8_64", drop_path_rate=0.1, layer_scale_init=0.1),
        "optim": {"lr": 1.5e-3, "min_lr": 1e-5, "warmup_fraction": 0.05},
        "train": {"batch_size": 64},
        "beit": {"masking": "random"},
        "tokenizer_preset": "dvae_64",
    },
    "beit_tiny_patch4_32": {
        "model": preset_dict("beit_tiny_patch4_32", drop_path_rate=0.1, layer_scale_init=0.1),
        "optim": {"lr": 1.5e-3, "min_lr": 1e-5, "warmup_fraction": 0.05},
        "train": {"batch_size": 64},
        "beit": {"masking": "random", "crop_scale": [0.35, 1.0]},
        "tokenizer_preset": "vq_32_small",
    },
}

_MAE_VIT = dict(use_sincos_pos_emb=True, use_abs_pos_emb=False, use_shared_rel_pos_bias=False,
                layer_scale_init=0.0, drop_path_rate=0.0)

# Named method_size_patchP_res after the backbone. MAE (arXiv 2111.06377, Appendix A.1; official
# main_pretrain.py): encoder with fixed sin-cos positions, no relative bias, no LayerScale, no drop path;
# AdamW betas (0.9, 0.95), blr 1.5e-4 x 4096/256 = 2.4e-3, wd 0.05, 800 epochs with 40 warmup, no gradient
# clipping; 75% masking, decoder 512w/8d/16h.
_MAE: dict[str, dict] = {
    "mae_base_patch16_224": {
        "model": preset_dict("beit_base_patch16_224", **_MAE_VIT),
        "optim": {"lr": 2.4e-3, "min_lr": 0.0, "weight_decay": 0.05, "warmup_fraction": 40 / 800,
                  "clip_grad": 0.0, "betas": [0.9, 0.95]},
        "train": {"epochs": 800, "batch_size": 4096, "num_workers": 10},
    },
    # CPU-sized: a 128-wide, 2-block decoder; the lr is raised as in the other tiny presets (short runs).
    "mae_tiny_patch4_32": {
        "model": preset_dict("beit_tiny_patch4_32", **_MAE_VIT),
        "optim": {"lr": 1.5e-3, "min_lr": 1e-5, "weight_decay": 0.05, "warmup_fraction": 0.05, "clip_grad": 0.0,
                  "betas": [0.9, 0.95]},
        "train": {"batch_size": 64},
        "mae": {"decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4},
    },
}

_IBOT_VIT = dict(use_abs_pos_emb=True, use_shared_rel_pos_bias=False, layer_scale_init=0.0, drop_path_rate=0.1,
                 use_mask_token=True)

# Named method_size_patchP_res after the backbone. iBOT (arXiv 2111.07832; official main_ibot.py and the
# released commands): ViT with learned absolute positions, no relative bias, no LayerScale, drop path 0.1
# (student); lr 5e-4 x batch/256, min 1e-6, 10 warmup epochs, wd 0.04 (constant here; the recipe ramps it to
# 0.4), clip 3; 2 global crops (0.25-1) + 10 local 96 px crops (0.05-0.25), shared head with 8192 prototypes,
# teacher temperatures 0.04 -> 0.07 over 30 epochs, momentum 0.996 -> 1, masking ratio 0 or U(0.1, 0.5) per crop.
_IBOT: dict[str, dict] = {
    "ibot_base_patch16_224": {
        "model": preset_dict("beit_base_patch16_224", **_IBOT_VIT),
        "optim": {"lr": 5e-4 * 1024 / 256, "min_lr": 1e-6, "weight_decay": 0.04, "warmup_fraction": 10 / 400,
                  "clip_grad": 3.0, "betas": [0.9, 0.999]},
        "train": {"epochs": 400, "batch_size": 1024, "num_workers": 10},
        "ibot": {"local_crops": 10, "local_crop_size": 96, "global_crop_scale": [0.25, 1.0],
                 "local_crop_scale": [0.05, 0.25], "teacher_temp_warmup": 30 / 400, "freeze_last_layer": 1 / 400},
    },
    # CPU-sized: 1024 prototypes and a 512-wide head (8192 x 2048 would dwarf the tiny backbone), no local
    # crops, teacher temperatures held at 0.04 (DINO's default): at the recipe's 0.07 the centred teacher of this
    # small head is near uniform within ~40 steps and the [CLS] loss sits at ln K (docs/notebook/2026-11-cifar10-hour.md).
    "ibot_tiny_patch4_32": {
        "model": preset_dict("beit_tiny_patch4_32", **_IBOT_VIT),
        "optim": {"lr": 5e-4, "min_lr": 1e-6, "weight_decay": 0.04, "warmup_fraction": 0.05, "clip_grad": 3.0},
        "train": {"batch_size": 64},
        "ibot": {"out_dim": 1024, "hidden_dim": 512, "bottleneck_dim": 128, "teacher_temp": 0.04,
                 "teacher_patch_temp": 0.04, "local_crop_size": 16},
    },
}

# method -> its presets (each sets ``method``) and its CPU-sized default (used without --preset or --config)
PRETRAIN: dict[str, dict[str, dict]] = {"beit": _BEIT, "ibot": _IBOT, "mae": _MAE}
PRETRAIN_DEFAULTS: dict[str, str] = {"beit": "beit_tiny_patch4_32", "ibot": "ibot_tiny_patch4_32",
                                     "mae": "mae_tiny_patch4_32"}

# The pretraining methods ``beit demo`` runs (BEiT needs the tokenizer stage). MAE by default: on the demo's images
# (and on CIFAR-10, docs/results.md) it beats BEiT on every learned number at the same budget, and
# needs no tokenizer; `--method beit` shows the tokenizer and BEiT.
DEMO_METHODS: tuple[str, ...] = ("mae", "beit")
DEMO_DEFAULT_METHOD = "mae"


# --------------------------------------------------------------------------------------------- downstream

def _finetune_model(name: str, **changes) -> dict:
    # fine-tuning layout: per-layer relative position bias, mean pooling + fc_norm, head scaled by 0.001
    return {**MODELS[name], "use_shared_rel_pos_bias": False, "use_rel_pos_bias": True,
            "use_mean_pooling": True, "head_init_scale": 0.001, **changes}


# Named after the backbone. ``beit_base_patch16_224`` is the paper's ImageNet-1k recipe (Appendix C,
# official run_class_finetuning.py: 8 GPUs x 128, lr 4e-3, 100 epochs, 20 warmup epochs, layer decay 0.65,
# drop path 0.1, min lr 1e-6, no gradient clipping). The CPU presets keep the recipe and shrink the batch;
# their layer decay is 0.75 because their 12 layers are narrow and their datasets small (less to preserve).
FINETUNE: dict[str, dict] = {
    "beit_base_patch16_224": {
        "model": _finetune_model("beit_base_patch16_224", drop_path_rate=0.1, layer_scale_init=0.1),
        "optim": {"lr": 4e-3, "min_lr": 1e-6, "weight_decay": 0.05, "layer_decay": 0.65,
                  "warmup_fraction": 20 / 100, "clip_grad": 0.0},
        "train": {"epochs": 100, "batch_size": 1024, "num_workers": 10},
        "aug": {"eval_crop_pct": 0.875},
    },
    "beit_small_patch8_64": {
        "model": _finetune_model("beit_small_patch8_64", drop_path_rate=0.1, layer_scale_init=0.1),
        "optim": {"lr": 2e-3, "min_lr": 1e-6, "weight_decay": 0.05, "layer_decay": 0.75,
                  "warmup_fraction": 0.1, "clip_grad": 0.0},
        "train": {"epochs": 50, "batch_size": 128},
        "aug": {"crop_scale": [0.25, 1.0], "eval_crop_pct": 0.875},
    },
    # Small labelled sets (docs/notebook/2026-11-cifar10-hour.md: CIFAR-10, 1,000 labels, on the 2-core CPU): no Mixup/CutMix
    # and lr 1e-3 ("R2") beat the ImageNet recipe from scratch (+8 points) and from MAE; RandAugment, random
    # erasing, label smoothing, drop path and layer decay stay.
    "beit_tiny_patch4_32": {
        "model": _finetune_model("beit_tiny_patch4_32", drop_path_rate=0.1, layer_scale_init=0.1),
        "optim": {"lr": 1e-3, "min_lr": 1e-6, "weight_decay": 0.05, "layer_decay": 0.75,
                  "warmup_fraction": 0.1, "clip_grad": 0.0},
        "train": {"epochs": 160, "batch_size": 128},
        # 32 px (CIFAR-like): a milder crop and no resize-then-crop at evaluation
        "aug": {"crop_scale": [0.35, 1.0], "eval_crop_pct": 1.0, "mixup": 0.0, "cutmix": 0.0},
    },
}


def _segment_model(name: str, **changes) -> dict:
    return {**MODELS[name], "use_shared_rel_pos_bias": False, "use_rel_pos_bias": True, **changes}


# The 11 classes of the SegNet CamVid version, in label order (255: unlabelled, ignored).
CAMVID_CLASSES: tuple[str, ...] = ("sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car", "pedestrian",
                  "bicyclist")


# ``beit_base_patch16_512``: the paper's ADE20K setting (Appendix D; official UperNet config for a
# self-supervised BEiT-base: 512 px crops, batch 16, 160k steps, lr 7e-4, layer decay 0.65, 1500 warmup
# steps, weight decay 0.05, drop path 0.1, head width 768). The CPU presets shrink the head and the run.
SEGMENT: dict[str, dict] = {
    "beit_base_patch16_512": {
        "model": _segment_model("beit_base_patch16_224", img_size=512, drop_path_rate=0.1, layer_scale_init=0.1),
        "optim": {"lr": 7e-4, "min_lr": 0.0, "layer_decay": 0.65, "warmup_steps": 1500, "weight_decay": 0.05},
        "train": {"steps": 160000, "batch_size": 16, "num_workers": 8, "eval_every": 16000},
        "head": {"channels": 768, "aux_channels": 256},
    },
    "beit_small_patch8_64": {
        "model": _segment_model("beit_small_patch8_64", drop_path_rate=0.1, layer_scale_init=0.1),
        "optim": {"lr": 7e-4, "min_lr": 0.0, "layer_decay": 0.75, "warmup_steps": -1, "warmup_fraction": 0.05},
        "train": {"steps": 4000, "batch_size": 16},
        "head": {"channels": 128, "aux_channels": 64},
    },
    "beit_tiny_patch4_32": {
        "model": _segment_model("beit_tiny_patch4_32", drop_path_rate=0.1, layer_scale_init=0.1),
        "optim": {"lr": 1e-3, "min_lr": 0.0, "layer_decay": 0.75, "warmup_steps": -1, "warmup_fraction": 0.05},
        "train": {"steps": 2000, "batch_size": 16},
        "head": {"channels": 64, "aux_channels": 32},
    },
    # CamVid at 160x120 (../shared/data/camvid-160x120.tar.gz): the tiny ViT (192 wide, 6 deep) in 8 px
    # patches on the whole non-square image, a 15x20 grid; a backbone pretrained on 64 px squares (8x8)
    # comes with its tables resized. 1,800 steps of 8 (39 epochs) take ~22 minutes on a Xeon with AMX in bf16,
    # one thread, compiled (0.65 s per step; docs/notebook/2026-11-camvid-segmentation.md).
    "camvid_tiny_patch8_120x160": {
        "model": _segment_model("beit_tiny_patch4_32", patch_size=8, img_size=[120, 160], drop_path_rate=0.1,
                        layer_scale_init=0.1),
        "data": {"crop_scale": [0.3, 1.0], "class_names": list(CAMVID_CLASSES)},
        "optim": {"lr": 1e-3, "min_lr": 0.0, "layer_decay": 0.75, "warmup_steps": -1, "warmup_fraction": 0.05,
                  "schedule": "poly", "power": 1.0},
        "train": {"steps": 1800, "batch_size": 8, "precision": "auto", "eval_every": 200, "ckpt_every": 200},
        "head": {"channels": 64, "aux_channels": 32},
        "eval": {"mode": "whole"},
    },
}


# --------------------------------------------------------------------------------------------- sizes


def parameter_count(model: dict[str, Any]) -> int:
    """Trainable parameters of the :class:`beit.models.VisionTransformer` a ``model`` config section builds,
    computed from the config alone (no torch), for ``beit presets``; tests check it against the built model.

    Per block: LayerNorms 2 x 2D, qkv 3D^2 (+ q and v biases 2D), projection D^2 + D, MLP 2DH + H + D, LayerScale
    2D, a per-layer relative position table R x heads. Around them: the patch projection (C p^2 D + D), [CLS],
    [MASK], learned absolute positions (N + 1) D, the shared relative table, the final LayerNorm, the heads.
    """
    cfg = model if isinstance(model, ModelConfig) else from_dict(ModelConfig, dict(model))
    D, heads, L = cfg.embed_dim, cfg.num_heads, cfg.depth
    H = int(D * cfg.mlp_ratio)
    gh, gw = (s // cfg.patch_size for s in image_hw(cfg.img_size))
    n, rel = gh * gw, (2 * gh - 1) * (2 * gw - 1) + 3
    block = 2 * 2 * D + 3 * D * D + (2 * D if cfg.qkv_bias else 0) + D * D + D + 2 * D * H + H + D
    block += 2 * D if cfg.layer_scale_init > 0 else 0
    block += rel * heads if cfg.use_rel_pos_bias else 0
    total = L * block + cfg.in_chans * cfg.patch_size**2 * D + D + D  # blocks, patch projection, [CLS]
    total += D if (cfg.vocab_size > 0 or cfg.use_mask_token) else 0
    total += (n + 1) * D if (cfg.use_abs_pos_emb and not cfg.use_sincos_pos_emb) else 0  # sin-cos is a buffer
    total += rel * heads if cfg.use_shared_rel_pos_bias else 0
    total += 2 * D  # the final LayerNorm: per token (norm) or after pooling (fc_norm), never both
    if cfg.num_classes > 0:
        head_in = D * cfg.head_grid**2 if cfg.head_grid else D
        total += head_in * cfg.num_classes + cfg.num_classes
    if cfg.vocab_size > 0:
        total += D * cfg.vocab_size + cfg.vocab_size
    return total


def image_hw_of(model: dict[str, Any]) -> tuple[int, int]:
    """``(height, width)`` of a ``model`` section's images (a preset without ``img_size`` has the default)."""
    return image_hw(model.get("img_size", ModelConfig.img_size))
