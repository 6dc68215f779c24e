"""MAE: masked autoencoder (He et al., arXiv 2111.06377): a batch of images -> pixel-reconstruction loss.

Per image, a random ``mask_ratio`` (75%) of the patches is removed by sorting uniform noise (Sec. 3,
"Masking": ``ids_shuffle = argsort(noise)``, the first ``N * (1 - ratio)`` are kept). The encoder, our one
:class:`~beit.models.vit.VisionTransformer` with fixed 2D sin-cos positions, runs on [CLS] + the visible
patches only (``forward_features(x, ids_keep=...)``). A lightweight decoder (Linear to 512 wide, a shared
[MASK] embedding for the removed positions, fixed sin-cos positions, 8 blocks of the same
:class:`~beit.models.vit.Block`, LayerNorm, Linear to ``p*p*3``) reconstructs every patch; the loss is the
per-patch mean squared error on the removed patches only, against the patch's pixels normalised by their own
mean and variance (``norm_pix_loss``, Sec. 3 "Reconstruction target", Table 1c), computed from the
network's (ImageNet-normalised) input exactly as the official code does.

Mask convention here as everywhere in the toolkit: ``mask`` is bool, **True = masked (removed)**, ``(B, N)``
in row-major patch order (the official code's float ``mask`` uses 1 = remove, the same meaning).

The encoder is the backbone every downstream command loads (``state_prefix = "encoder."``); the run's
``model`` config section rebuilds it as a plain ``VisionTransformer``. The decoder lives only in the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from .. import recipes
from ..config import ConfigError, ModelConfig, check_fields, replace
from ..data.views import BeitPretrainTransform, TwoViewTransform
from ..models.vit import Block, VisionTransformer, sincos_pos_embed
from .base import Method
from .pixels import patchify, pixel_targets, unpatchify
from .registry import register

__all__ = [
    "MAEConfig",
    "MAEMethod",
    "MAETransform",
    "build_mae_transform",
    "mae_loss",
    "random_masking",
    "unpatchify",
    "unshuffle",
]


@dataclass
class MAEConfig:
    """MAE pretraining knobs (paper Sec. 3 and Appendix A.1; official ``main_pretrain.py`` defaults)."""

    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    norm_pix_loss: bool = True  # per-patch normalised pixels as the target (the paper's default setting)
    # augmentation: RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip, nothing else
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    interp: str = "bicubic"

    def __post_init__(self) -> None:
        check_fields(self, "mae", {"decoder_dim decoder_depth decoder_heads": "size", "hflip": "prob",
                                   "decoder_mlp_ratio crop_scale crop_ratio": "positive"})
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"mae.mask_ratio must lie in [0, 1), got {self.mask_ratio}")
        if self.decoder_dim % self.decoder_heads:
            raise ConfigError(f"mae.decoder_dim={self.decoder_dim} is not divisible by "
                              f"mae.decoder_heads={self.decoder_heads}")
        if self.decoder_dim % 4:
            raise ConfigError(f"mae.decoder_dim={self.decoder_dim} must be divisible by 4 (sin-cos positions)")
        if self.decoder_depth < 1:
            raise ConfigError("mae.decoder_depth must be >= 1")


# --------------------------------------------------------------------------------------------- pure pieces


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per image: ``int(N * (1 - ratio))`` as in the official code (49 of 196 at 75%)."""
    return max(1, int(num_patches * (1 - mask_ratio)))


def random_masking(noise: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by sorting noise (MAE Sec. 3).

    ``noise (B, N)`` uniform -> ``ids_keep (B, L)`` (the L patches with the smallest noise, in noise order),
    ``ids_restore (B, N)`` (inverse permutation: ``unshuffle`` puts a shuffled sequence back in patch order)
    and ``mask (B, N)`` bool, **True = masked (removed)**, in patch order. Exactly ``N - L`` True per row.
    """
    B, N = noise.shape
    keep = num_kept(N, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, N): small noise first = kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, N)
    ids_keep = ids_shuffle[:, :keep]  # (B, L)
    shuffled_mask = torch.ones(B, N, dtype=torch.bool, device=noise.device)
    shuffled_mask[:, :keep] = False
    mask = shuffled_mask.gather(1, ids_restore)  # (B, N), back in patch order
    return ids_keep, ids_restore, mask


def shuffle(x: torch.Tensor, ids_shuffle: torch.Tensor) -> torch.Tensor:
    """``x (B, N, C)`` -> ``x[b, ids_shuffle[b]]`` (B, N, C)."""
    return x.gather(1, ids_shuffle.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def unshuffle(x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`shuffle` given ``ids_restore = argsort(ids_shuffle)``: ``(B, N, C)`` in patch order."""
    return x.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over removed patches of the per-patch MSE: ``sum_{b,i} m_bi * mean_j (pred - target)^2 / sum m``.

    ``pred``, ``target`` ``(B, N, P)``; ``mask (B, N)`` bool, True = removed.
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp(min=1.0)


# --------------------------------------------------------------------------------------------- the method


def _decoder_config(model_cfg: ModelConfig, cfg: MAEConfig) -> ModelConfig:
    """A ModelConfig describing one decoder block (the decoder reuses the backbone's Block)."""
    return replace(
        model_cfg, embed_dim=cfg.decoder_dim, num_heads=cfg.decoder_heads, mlp_ratio=cfg.decoder_mlp_ratio,
        depth=cfg.decoder_depth, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
        layer_scale_init=0.0, use_shared_rel_pos_bias=False, use_rel_pos_bias=False, use_abs_pos_emb=False,
        use_sincos_pos_emb=True, vocab_size=0, num_classes=0, use_mask_token=False,
    )


@torch.no_grad()
def mae_init_(module: nn.Module) -> None:
    """Official MAE initialisation: xavier-uniform Linear weights, zero biases, unit LayerNorms, the patch
    projection initialised like a Linear (xavier on its flattened weight)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MAEMethod(Method):
    """``forward(batch) -> (loss, {"loss"})`` for the engine.

    ``batch``: ``images`` (B, 3, H, W) normalised; ``noise`` (B, N) uniform in [0, 1) (drawn by the data
    transform so masks are seeded per sample; drawn here from the global RNG when absent).
    """

    state_prefix = "encoder."

    def __init__(self, encoder: VisionTransformer, cfg: MAEConfig | None = None):
        super().__init__()
        self.cfg = cfg if cfg is not None else MAEConfig()
        self.encoder = encoder
        ecfg = encoder.cfg
        self.patch_size = ecfg.patch_size
        dcfg = _decoder_config(ecfg, self.cfg)
        self.decoder_embed = nn.Linear(ecfg.embed_dim, dcfg.embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dcfg.embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(dcfg.embed_dim, encoder.grid_size))  # (1, 1+N, Dd)
        self.decoder_blocks = nn.ModuleList(Block(dcfg, 0.0, 0) for _ in range(dcfg.depth))
        self.decoder_norm = nn.LayerNorm(dcfg.embed_dim, eps=ecfg.layer_norm_eps)
        self.decoder_pred = nn.Linear(dcfg.embed_dim, self.patch_size**2 * ecfg.in_chans)
        for mod in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            mae_init_(mod)
        nn.init.normal_(self.mask_token, std=0.02)

    @classmethod
    def build(cls, model_cfg: ModelConfig, cfg: MAEConfig | None = None) -> MAEMethod:
        """Encoder from ``model_cfg`` (no heads, no [MASK]: the decoder owns the mask token), MAE init."""
        model_cfg = replace(model_cfg, vocab_size=0, num_classes=0, use_mask_token=False)
        encoder = VisionTransformer(model_cfg)
        mae_init_(encoder)
        nn.init.normal_(encoder.cls_token, std=0.02)
        if isinstance(encoder.pos_embed, nn.Parameter):
            nn.init.normal_(encoder.pos_embed, std=0.02)
        return cls(encoder, cfg)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    # ------------------------------------------------------------------------------------------ pieces

    def forward_encoder(self, images: torch.Tensor, noise: torch.Tensor):
        """-> latent ``(B, 1+L, D)``, ``ids_restore (B, N)``, ``mask (B, N)`` (True = removed)."""
        ids_keep, ids_restore, mask = random_masking(noise, self.cfg.mask_ratio)
        latent = self.encoder.forward_features(images, ids_keep=ids_keep)  # (B, 1+L, D), [CLS] + visible
        return latent, ids_restore, mask

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """``latent (B, 1+L, D)`` -> predicted pixels ``(B, N, p*p*3)`` for every patch, in patch order."""
        x = self.decoder_embed(latent)  # (B, 1+L, Dd)
        B, T, Dd = x.shape
        N = ids_restore.shape[1]
        fill = self.mask_token.to(x.dtype).expand(B, N + 1 - T, Dd)  # (B, N-L, Dd)
        seq = unshuffle(torch.cat((x[:, 1:], fill), dim=1), ids_restore)  # (B, N, Dd) in patch order
        x = torch.cat((x[:, :1], seq), dim=1) + self.decoder_pos_embed  # (B, 1+N, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))  # (B, 1+N, p*p*3)
        return x[:, 1:]  # drop [CLS]

    def _noise(self, batch: dict[str, Any], images: torch.Tensor) -> torch.Tensor:
        noise = batch.get("noise")
        if noise is None:
            noise = torch.rand(images.shape[0], self.encoder.patch_embed.num_patches, device=images.device)
        return noise.to(images.device).float()

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["images"]  # (B, 3, H, W)
        latent, ids_restore, mask = self.forward_encoder(images, self._noise(batch, images))
        pred = self.forward_decoder(latent, ids_restore)  # (B, N, p*p*3)
        target = pixel_targets(images, self.patch_size, self.cfg.norm_pix_loss)  # (B, N, p*p*3)
        loss = mae_loss(pred, target, mask)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructed images ``(B, 3, H, W)`` in the input's (normalised) pixel space and the mask
        ``(B, N)`` (True = removed). With ``norm_pix_loss`` the prediction is mapped back with each patch's
        own mean and std (the official visualisation does the same; it needs the true patch statistics)."""
        noise = self._noise({"noise": noise}, images)
        latent, ids_restore, mask = self.forward_encoder(images, noise)
        pred = self.forward_decoder(latent, ids_restore).float()  # (B, N, p*p*3)
        if self.cfg.norm_pix_loss:
            raw = patchify(images.float(), self.patch_size)
            mean, var = raw.mean(-1, keepdim=True), raw.var(-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        return unpatchify(pred, self.patch_size, images.shape[1], grid), mask


# --------------------------------------------------------------------------------------------- data


class MAETransform(BeitPretrainTransform):
    """``image -> {"images": (3, H, W) normalised, "noise": (N,) uniform}``: random resized crop + flip.

    All randomness comes from one generator seeded by a single draw from torch's global RNG (which the
    engine seeds per sample), so masks and crops are fixed by the sample: exact resume, DDP == 1 process.
    It is the BEiT pretraining transform with per-patch noise in place of the mask, so it shares its
    batched loader path (per-pixel work once per batch; on CUDA after the transfer, from uint8).
    """

    def __init__(self, views: TwoViewTransform, num_patches: int):
        super().__init__(views, partial(_uniform_noise, num_patches), mask_key="noise")
        self.num_patches = num_patches

    def __repr__(self) -> str:
        return f"MAETransform(views={self.views!r}, num_patches={self.num_patches})"


def _uniform_noise(num_patches: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(num_patches, generator=g)  # (N,): MAE keeps the patches with the smallest noise


def build_mae_transform(cfg: MAEConfig, model_cfg: ModelConfig) -> MAETransform:
    views = TwoViewTransform(model_cfg.img_size, None, scale=cfg.crop_scale, ratio=cfg.crop_ratio, hflip=cfg.hflip,
                             color_jitter=0.0, patch_interp=cfg.interp)
    return MAETransform(views, model_cfg.num_patches)


def build(cfg):
    """Registry builder for ``--method mae``: (method, per-sample transform, resolved PretrainConfig)."""
    method = MAEMethod.build(cfg.model, cfg.mae)
    cfg = dataclasses.replace(cfg, model=method.encoder.cfg)
    return method, build_mae_transform(cfg.mae, cfg.model), cfg


PRESETS: dict[str, dict] = recipes.PRETRAIN["mae"]  # the recipes live in beit.recipes (no torch)

register("mae", build, config=MAEConfig, presets=PRESETS, default_preset=recipes.PRETRAIN_DEFAULTS["mae"])
