"""VQ-KD: the semantic visual tokenizer of BEiT v2 (Peng et al., arXiv 2208.06366, Sec. 2.2).

A ViT encoder turns the image into patch vectors; a small "task layer" (Linear-Tanh-Linear) projects each
to a low-dimensional code space (the paper: 32); the vector is l2-normalised and its token id is the
codebook entry of highest cosine similarity (Eq. 1: the codebook rows are l2-normalised too, so the
nearest code in l2 distance is the one of highest cosine). A decoder ViT (patch size 1 on the grid of codes)
and a second task layer map the quantized codes back to the feature space of a frozen *teacher*; training
(:mod:`beit.tokenizers.vqkd`) maximises the cosine between the decoder's output and the teacher's features.

For BEiT pretraining only the encode path matters: images in [0, 1] -> encoder -> task layer -> l2
normalise -> nearest code id. :class:`VQKDTokenizer` has the interface of
:class:`beit.models.tokenizer.Tokenizer` that BEiT uses (``encode``, ``vocab_size``, ``cfg.img_size``,
``cfg.grid_size``); it has no pixel decoder (``decode`` raises).

Module names follow the official ``modeling_vqkd.py`` (``encoder``, ``decoder``, ``encode_task_layer``,
``decode_task_layer``), so converted official checkpoints (:mod:`beit.tokenizers.beit2`) load by renaming
only the final norms and the codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import recipes
from ..config import ConfigError, ModelConfig, TokenGrid, check_fields, replace
from .tokenizer import ImageTokenizer
from .vit import VisionTransformer

__all__ = ["VQKD_PRESETS", "VQKDConfig", "VQKDTokenizer", "get_vqkd_preset", "l2norm"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last dimension (zero vectors stay zero)."""
    return F.normalize(x, p=2, dim=-1)


@dataclass
class VQKDConfig(TokenGrid):
    """One VQ-KD tokenizer: encoder, codebook, decoder, and the teacher feature size it reconstructs."""

    img_size: int = 32
    in_chans: int = 3
    patch_size: int = 4
    vocab_size: int = 1024  # K codebook entries (the paper: 8192)
    embed_dim: int = 32  # dimension of a code (the paper: 32; low dimension keeps the codebook in use)
    encoder_dim: int = 192
    encoder_depth: int = 4
    encoder_heads: int = 3
    decoder_dim: int = 192
    decoder_depth: int = 1  # the paper: 1 (Table 8 also 3)
    decoder_heads: int = 3
    target_dim: int = 0  # the teacher's feature width; 0 until the teacher is known (training sets it)
    # pixels -> encoder input: "minus_one_one" (2x - 1, the official process_type "default") | "imagenet"
    input_norm: str = "minus_one_one"
    quantizer: str = "vqkd"  # marks this kind of tokenizer in saved configs (the dVAE/VQ ones: gumbel | vq)

    def __post_init__(self) -> None:
        check_fields(self, "model", {"img_size in_chans patch_size vocab_size embed_dim encoder_dim encoder_depth "
                                     "encoder_heads decoder_dim decoder_depth decoder_heads": "size",
                                     "target_dim": "count"})
        if self.quantizer != "vqkd":
            raise ConfigError(f"a VQ-KD tokenizer has model.quantizer=vqkd, got {self.quantizer!r}")
        if self.vocab_size < 2:
            raise ConfigError(f"model.vocab_size must be >= 2, got {self.vocab_size}")
        if self.img_size % self.patch_size:
            raise ConfigError(f"model.img_size={self.img_size} is not a multiple of model.patch_size={self.patch_size}")
        for part in ("encoder", "decoder"):
            if getattr(self, f"{part}_dim") % getattr(self, f"{part}_heads"):
                raise ConfigError(f"model.{part}_dim must be divisible by model.{part}_heads")
        if self.input_norm not in ("minus_one_one", "imagenet"):
            raise ConfigError(f"model.input_norm must be minus_one_one or imagenet, got {self.input_norm!r}")

    @property
    def downsample(self) -> int:  # pixels per token side (TokenGrid)
        return self.patch_size


# 32 px: the CIFAR-scale BEiT preset's 8x8 grid (beit_tiny_patch4_32), ViT-Tiny width at a third of its depth
# and a 1024 x 32 codebook (CIFAR-10 has 50k images x 64 patches: 8192 codes would each see too few vectors).
# 224 px: the paper's tokenizer (ViT-B/16 encoder, 8192 x 32 codebook, one-block decoder), teacher-agnostic.
VQKD_PRESETS: dict[str, VQKDConfig] = {name: VQKDConfig(**kw) for name, kw in recipes.VQKD_TOKENIZERS.items()}


def get_vqkd_preset(name: str) -> VQKDConfig:
    if name not in VQKD_PRESETS:
        raise ConfigError(f"unknown VQ-KD preset {name!r} (known: {', '.join(sorted(VQKD_PRESETS))})")
    return replace(VQKD_PRESETS[name])


def _vit(img_size: int, patch_size: int, in_chans: int, dim: int, depth: int, heads: int) -> VisionTransformer:
    """A headless ViT with learnt absolute positions and no LayerScale: the official VQ-KD encoder/decoder."""
    return VisionTransformer(ModelConfig(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=dim, depth=depth, num_heads=heads,
        use_abs_pos_emb=True, use_shared_rel_pos_bias=False, use_rel_pos_bias=False, layer_scale_init=0.0,
        drop_path_rate=0.0, num_classes=0, vocab_size=0, use_fc_norm=False))


def _task_layer(d_in: int, d_out: int) -> nn.Sequential:
    """Linear-Tanh-Linear between a ViT and the code / teacher space (official ``*_task_layer``)."""
    layer = nn.Sequential(nn.Linear(d_in, d_in), nn.Tanh(), nn.Linear(d_in, d_out))
    for m in layer:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
            nn.init.zeros_(m.bias)
    return layer


class VQKDTokenizer(ImageTokenizer):
    """Images in [0, 1] -> semantic token ids; codes -> teacher features (training only).

    ``codebook`` (vocab_size, embed_dim) is a buffer of unit rows, updated by EMA during training.
    """

    def __init__(self, cfg: VQKDConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = _vit(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.encoder_dim, cfg.encoder_depth,
                            cfg.encoder_heads)
        self.encode_task_layer = _task_layer(cfg.encoder_dim, cfg.embed_dim)
        self.register_buffer("codebook", l2norm(torch.randn(cfg.vocab_size, cfg.embed_dim)))
        h, _ = cfg.grid_size
        self.decoder = _vit(h, 1, cfg.embed_dim, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads)
        self.decode_task_layer = _task_layer(cfg.decoder_dim, cfg.target_dim) if cfg.target_dim else None
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.input_norm == "imagenet" else ((0.5,) * 3, (0.5,) * 3)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def encode_vectors(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, h, w, embed_dim) l2-normalised code-space vectors (with gradients)."""
        return self._code_vectors(self._encoder_tokens(images))

    def _encoder_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, N, encoder_dim) patch tokens after the encoder's final norm."""
        self._check_images(images)
        x = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        return self.encoder.forward_features(x)[:, 1:]

    def _code_vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, encoder_dim) -> (B, h, w, embed_dim) l2-normalised codes (the task layer)."""
        z = l2norm(self.encode_task_layer(tokens))  # (B, N, embed_dim)
        h, w = self.cfg.grid_size
        return z.reshape(len(z), h, w, -1)

    def nearest_code(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) unit vectors -> (...) ids of the codebook rows of highest cosine similarity."""
        return (z @ self.codebook.to(z.dtype).t()).argmax(-1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 256, *, check_range: bool = True) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, h, w) long token ids. The encoder ViT runs in the caller's
        autocast; the task layer, the l2 norm and the nearest code run in fp32 (as the dVAE's code head in
        :meth:`beit.models.tokenizer.Tokenizer.encode`). ``check_range=False`` skips the [0, 1] check."""
        self._check_images(images)
        if check_range:
            lo, hi = float(images.min()), float(images.max())
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise ValueError(f"tokenizer expects pixels in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
        return torch.cat([self._encode_ids(c) for c in images.split(batch_size)])

    def _encode_ids(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self._encoder_tokens(images)  # in the caller's autocast dtype
        with torch.autocast(tokens.device.type, enabled=False):
            return self.nearest_code(self._code_vectors(tokens.float()))

    def decode_features(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w, embed_dim) (quantized) codes -> (B, h*w, target_dim) predicted teacher features."""
        if self.decode_task_layer is None:
            raise ValueError("this VQ-KD tokenizer has no decoder head (model.target_dim=0)")
        tokens = self.decoder.forward_features(codes.permute(0, 3, 1, 2))[:, 1:]  # (B, N, decoder_dim)
        return self.decode_task_layer(tokens)

    def decode(self, ids: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        raise ConfigError("a VQ-KD tokenizer has no pixel decoder: its codes stand for teacher features, not pixels "
                          "(pictures of decoded tokens need a dVAE or VQ-VAE tokenizer)")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)
