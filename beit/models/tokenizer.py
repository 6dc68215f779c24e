"""DALL-E compatible discrete VAE: the visual tokenizer of BEiT (arXiv 2106.08254, Sec. 2.1.2).

The architecture follows the DALL-E dVAE (arXiv 2102.12092, Appendix A.1; the ``dall_e`` package):

- Encoder: 7x7 conv -> ``n_groups`` groups of ``n_blk_per_group`` residual blocks, widths
  ``n_hid * 2**g``, a 2x max-pool between groups -> ReLU -> 1x1 conv to ``vocab_size`` logits.
- Decoder: 1x1 conv from the (one-hot) code -> groups of residual blocks, widths ``n_hid * 2**(G-1-g)``,
  a nearest 2x upsample between groups -> ReLU -> 1x1 conv to ``2 * in_chans`` channels: the mean and
  the log-scale of a logit-Laplace distribution per sub-pixel.
- Residual block: ``id_path(x) + post_gain * res_path(x)`` with ``post_gain = 1 / n_layers**2``
  (``n_layers = n_groups * n_blk_per_group``), res path ``relu-conv-relu-conv-relu-conv-relu-conv`` with
  kernels 3,3,3,1 (encoder) or 1,3,3,3 (decoder) and a hidden width of ``n_out / 4``.

Parameter names mirror ``dall_e`` exactly (``blocks.input.w``, ``blocks.group_1.block_1.res_path.conv_1.b``,
``blocks.output.conv.w``, ...), so the official ``encoder.pkl``/``decoder.pkl`` weights load 1:1 with
``n_groups=4`` (see :mod:`beit.tokenizers.dalle`).

``quantizer="vq"`` swaps the categorical code for a VQ-VAE codebook (arXiv 1711.00937): the encoder
emits ``embed_dim`` channels, the code is the nearest codebook row, the decoder reads ``embed_dim``
channels. The public interface (:class:`Tokenizer`) is the same for both.

Pixels: images are float ``(B, C, H, W)`` in ``[0, 1]``; :meth:`Tokenizer.encode` applies
:func:`map_pixels` itself, so callers never do.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import recipes
from ..checkpoint_io import CheckpointError, check_finite, removed_on_failure, write_safetensors
from ..config import ConfigError, TokenGrid, replace, to_dict

LOGIT_LAPLACE_EPS = 0.1
TOKENIZER_FILE = "tokenizer.safetensors"
TOKENIZER_FORMAT = "beit-tokenizer"  # the ``format`` in a tokenizer file's header: how it is recognised


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps], so the logit-Laplace density stays finite at 0 and 1 (DALL-E Sec. A.3)."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to [0, 1]."""
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


# --------------------------------------------------------------------------------------------- config


@dataclass
class TokenizerConfig(TokenGrid):
    """One tokenizer: architecture plus the image size it was trained for."""

    img_size: int = 32
    in_chans: int = 3
    vocab_size: int = 512
    n_hid: int = 64  # width of the first encoder group (and last decoder group); doubles per group
    n_groups: int = 3  # n_groups - 1 poolings: the token grid is img_size / 2**(n_groups - 1)
    n_blk_per_group: int = 1
    n_init: int = 128  # width of the decoder's input 1x1 conv (DALL-E: 128)
    quantizer: str = "gumbel"  # gumbel (DALL-E dVAE, categorical code) | vq (VQ-VAE, EMA codebook)
    embed_dim: int = 64  # vq only: size of a codebook vector

    def __post_init__(self) -> None:
        if self.quantizer not in ("gumbel", "vq"):
            raise ConfigError(f"model.quantizer must be gumbel or vq, got {self.quantizer!r}")
        for key in ("img_size", "in_chans", "n_groups", "n_blk_per_group", "n_init", "embed_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.vocab_size < 2:
            raise ConfigError(f"model.vocab_size must be >= 2, got {self.vocab_size}")
        if self.n_hid < 4 or self.n_hid % 4:
            raise ConfigError(f"model.n_hid must be a positive multiple of 4, got {self.n_hid}")
        if self.img_size % self.downsample:
            raise ConfigError(
                f"model.img_size={self.img_size} is not a multiple of {self.downsample} "
                f"(2**(n_groups-1) with n_groups={self.n_groups})"
            )

    @property
    def downsample(self) -> int:
        return 2 ** (self.n_groups - 1)



# the architectures live in beit.recipes (no torch)
TOKENIZER_PRESETS: dict[str, TokenizerConfig] = {
    name: TokenizerConfig(**kw) for name, kw in recipes.TOKENIZERS.items()}


def get_tokenizer_preset(name: str) -> TokenizerConfig:
    """A fresh copy of a registered tokenizer config."""
    if name not in TOKENIZER_PRESETS:
        raise ConfigError(f"unknown tokenizer preset {name!r} (known: {', '.join(sorted(TOKENIZER_PRESETS))})")
    return replace(TOKENIZER_PRESETS[name])


# --------------------------------------------------------------------------------------------- layers


class Conv2d(nn.Module):
    """'Same' convolution with parameters named ``w`` and ``b``, as ``dall_e.utils.Conv2d`` (1:1 weights)."""

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        if kw % 2 != 1:
            raise ValueError(f"kernel width must be odd, got {kw}")
        self.kw = kw
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw).normal_(std=1 / math.sqrt(n_in * kw**2)))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)

    def extra_repr(self) -> str:
        return f"{self.w.shape[1]}, {self.w.shape[0]}, kw={self.kw}"


class ResBlock(nn.Module):
    """DALL-E encoder/decoder block: ``id_path(x) + post_gain * res_path(x)``."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]) -> None:
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers: list[tuple[str, nn.Module]] = []
        for i, k in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv2d(widths[i], widths[i + 1], k))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    """(B, in_chans, H, W) mapped pixels -> (B, n_out, H / 2**(G-1), W / 2**(G-1)) code logits/vectors."""

    def __init__(self, n_groups: int, n_hid: int, n_blk_per_group: int, in_chans: int, n_out: int) -> None:
        super().__init__()
        n_layers = n_groups * n_blk_per_group
        groups: list[tuple[str, nn.Module]] = [("input", Conv2d(in_chans, n_hid, 7))]
        width = n_hid
        for g in range(n_groups):
            out = n_hid * 2**g
            blocks: list[tuple[str, nn.Module]] = []
            for i in range(n_blk_per_group):
                blocks.append((f"block_{i + 1}", ResBlock(width, out, n_layers, (3, 3, 3, 1))))
                width = out
            if g < n_groups - 1:
                blocks.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(blocks))))
        groups.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(width, n_out, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before ``blocks.output`` (the code head): what a reduced-precision encode may compute."""
        for name, module in self.blocks.named_children():
            if name != "output":
                x = module(x)
        return x


class Decoder(nn.Module):
    """(B, n_in, h, w) code -> (B, 2 * out_chans, h * 2**(G-1), w * 2**(G-1)): logit-Laplace mu, log-scale."""

    def __init__(
        self, n_groups: int, n_init: int, n_hid: int, n_blk_per_group: int, out_chans: int, n_in: int
    ) -> None:
        super().__init__()
        n_layers = n_groups * n_blk_per_group
        groups: list[tuple[str, nn.Module]] = [("input", Conv2d(n_in, n_init, 1))]
        width = n_init
        for g in range(n_groups):
            out = n_hid * 2 ** (n_groups - 1 - g)
            blocks: list[tuple[str, nn.Module]] = []
            for i in range(n_blk_per_group):
                blocks.append((f"block_{i + 1}", ResBlock(width, out, n_layers, (1, 3, 3, 3))))
                width = out
            if g < n_groups - 1:
                blocks.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(blocks))))
        groups.append(
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(width, 2 * out_chans, 1))])))
        )
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)

    def forward_from_input(self, h: torch.Tensor) -> torch.Tensor:
        """Everything after ``blocks.input``: for codes whose input projection was done by a lookup."""
        for name, module in self.blocks.named_children():
            if name != "input":
                h = module(h)
        return h


class Codebook(nn.Module):
    """VQ-VAE codebook: ``embed`` (vocab_size, embed_dim), a buffer updated by EMA during training."""

    def __init__(self, vocab_size: int, embed_dim: int) -> None:
        super().__init__()
        self.register_buffer("embed", torch.randn(vocab_size, embed_dim))

    def neg_distances(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D) vectors -> (N, K) negative squared distances to every code (argmax = nearest)."""
        e = self.embed.to(z.dtype)
        return 2 * z @ e.t() - z.pow(2).sum(1, keepdim=True) - e.pow(2).sum(1)[None]


# --------------------------------------------------------------------------------------------- tokenizer


class ImageTokenizer(nn.Module):
    """What every tokenizer model shares (pixel: :class:`Tokenizer`; semantic: :class:`~beit.models.vqkd.VQKDTokenizer`):
    a ``cfg`` with ``vocab_size``, ``img_size`` and a token grid, and the check of the images it is given."""

    cfg: TokenGrid  # a TokenizerConfig or VQKDConfig

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.cfg.grid_size

    def _check_images(self, x: torch.Tensor) -> None:
        c, s = getattr(self.cfg, "in_chans", 3), self.cfg.img_size
        if not torch.is_tensor(x) or x.ndim != 4 or not x.is_floating_point():
            got = f"{tuple(x.shape)} {x.dtype}" if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"tokenizer expects a float tensor (B, {c}, {s}, {s}) in [0, 1], got {got}")
        if x.shape[1] != c or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(
                f"tokenizer was built for (B, {c}, {s}, {s}) images, got {tuple(x.shape)}: resize/crop the "
                f"images to {s}x{s} or use a tokenizer trained for that size"
            )


class Tokenizer(ImageTokenizer):
    """Images in [0, 1] <-> discrete token ids, for a dVAE (Gumbel) or VQ-VAE code.

    ``encode``: (B, C, H, W) float in [0, 1] -> (B, h, w) long ids; ``decode``: ids -> (B, C, H, W) in [0, 1].
    """

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        code_dim = cfg.vocab_size if cfg.quantizer == "gumbel" else cfg.embed_dim
        self.encoder = Encoder(cfg.n_groups, cfg.n_hid, cfg.n_blk_per_group, cfg.in_chans, code_dim)
        self.decoder = Decoder(cfg.n_groups, cfg.n_init, cfg.n_hid, cfg.n_blk_per_group, cfg.in_chans, code_dim)
        self.codebook = Codebook(cfg.vocab_size, cfg.embed_dim) if cfg.quantizer == "vq" else None

    def encode_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, vocab_size, h, w) code logits (VQ: negative squared distances)."""
        self._check_images(images)
        return self._code_logits(self.encoder(map_pixels(images)))  # (B, K or D, h, w) -> (B, K, h, w)

    def _code_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, K or D, h, w) -> (B, K, h, w) code logits (VQ: negative squared distances)."""
        if self.codebook is None:
            return z
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        logits = self.codebook.neg_distances(flat)  # (B*h*w, K)
        return logits.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # (B, K, h, w)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 256, *, check_range: bool = True) -> torch.Tensor:
        """(B, C, H, W) float in [0, 1] -> (B, h, w) long token ids (argmax of the code logits).

        The encoder body runs in whatever autocast the caller set (BEiT's ``beit.tokenizer_precision``); the
        code head (the logits conv, or the codebook distances) and the argmax always run in fp32, as the
        official DALL-E encoder keeps its output conv in fp32: a reduced-precision encode changes an id only
        where the encoder's features change, never through rounded logits or ties. Without autocast this is
        exactly the fp32 computation. ``check_range=False`` skips the [0, 1] check, a host sync per call that
        a caller which checked its first batch can spare."""
        self._check_images(images)
        if check_range:
            lo, hi = float(images.min()), float(images.max())
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise ValueError(
                    f"tokenizer expects pixels in [0, 1], got values in [{lo:.3g}, {hi:.3g}] "
                    "(were the images normalised with a mean/std?)"
                )
        # channels-last: oneDNN's fast convolution layout on CPU (measured 2-2.6x faster encode in bf16 and
        # fp32 for vq_32 and dalle_112, docs/notebook/2026-11-cpu-speed.md); the ids are the same computation
        return torch.cat([self._encode_ids(chunk.contiguous(memory_format=torch.channels_last))
                          for chunk in images.split(batch_size)])

    def _encode_ids(self, images: torch.Tensor) -> torch.Tensor:
        h = self.encoder.features(map_pixels(images))  # (B, C', h, w), in the caller's autocast dtype
        with torch.autocast(h.device.type, enabled=False):
            z = self.encoder.blocks.output(h.float())  # (B, K or D, h, w) fp32
            return self._code_logits(z).argmax(1)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h, w) ids -> (B, n_init, h, w): the decoder's input layer, as a lookup instead of a one-hot conv."""
        inp = self.decoder.blocks.input
        w = inp.w[:, :, 0, 0]  # (n_init, K or D)
        if self.codebook is None:
            h = F.embedding(ids, w.t()) + inp.b  # (B, h, w, n_init): column ids of w == conv of a one-hot
        else:
            h = F.embedding(ids, self.codebook.embed) @ w.t() + inp.b  # (B, h, w, n_init)
        return h.permute(0, 3, 1, 2)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(B, h, w) long ids -> (B, C, h * 2**(G-1), w * 2**(G-1)) images in [0, 1]."""
        if not torch.is_tensor(ids) or ids.ndim != 3 or ids.dtype not in (torch.int64, torch.int32):
            got = f"{tuple(ids.shape)} {ids.dtype}" if torch.is_tensor(ids) else type(ids).__name__
            raise ValueError(f"decode expects integer token ids (B, h, w), got {got}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        out = []
        for chunk in ids.long().split(batch_size):
            stats = self.decoder.forward_from_input(self.embed_ids(chunk))  # (b, 2C, H, W)
            out.append(stats_to_images(stats, self.cfg.in_chans))
        return torch.cat(out)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        return self.decode(self.encode(images, batch_size), batch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)


def stats_to_images(stats: torch.Tensor, in_chans: int = 3) -> torch.Tensor:
    """Decoder output (B, 2C, H, W) -> images in [0, 1]: ``unmap_pixels(sigmoid(mu))`` (DALL-E)."""
    return unmap_pixels(torch.sigmoid(stats[:, :in_chans].float()))


# --------------------------------------------------------------------------------------------- files


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Write ``tokenizer.safetensors`` (weights + config in the header, and the file's own SHA-256, so that
    damage is found wherever the file travels) into a folder or to a file path. Non-finite weights are
    refused (:class:`~beit.checkpoint_io.NonFiniteError`)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / TOKENIZER_FILE
    tensors = {k: v.detach().cpu().contiguous() for k, v in tok.state_dict().items()}
    check_finite(tensors, f"refusing to write the tokenizer {path}")
    meta = {"format": TOKENIZER_FORMAT, "config": json.dumps(to_dict(tok.cfg))}
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with removed_on_failure(path, tmp):
        write_safetensors(tensors, tmp, meta, finite=False)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written tokenizer
    return path


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer file ``path`` names: ``path`` itself, or ``path/tokenizer.safetensors`` for a folder."""
    path = Path(path)
    return path / TOKENIZER_FILE if path.is_dir() else path


class TokenizerFileError(CheckpointError, ValueError):
    """The path given as a tokenizer does not hold one (a backbone, an unfinished run, a damaged file).

    ``folder``: the folder that holds no tokenizer file, if that is the mistake; what it holds instead (a
    backbone run, an unfinished tokenizer run) is worded above the models (:func:`beit.loading.not_a_tokenizer`,
    applied by the CLI), since a model file knows nothing of run folders."""

    def __init__(self, message: str, folder: Path | None = None) -> None:
        super().__init__(message)
        self.folder = folder


__all__ = [
    "LOGIT_LAPLACE_EPS",
    "TOKENIZER_FORMAT",
    "TOKENIZER_PRESETS",
    "Codebook",
    "Conv2d",
    "TokenizerConfig",
    "Decoder",
    "Encoder",
    "Tokenizer",
    "get_tokenizer_preset",
    "map_pixels",
    "save_tokenizer",
    "stats_to_images",
    "unmap_pixels",
]
