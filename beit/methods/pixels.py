"""Pixels as prediction targets: images <-> per-patch pixel rows, and the (normalised) targets of
MAE and of BEiT's ``target=pixels`` ablation."""

from __future__ import annotations

import math

import torch

__all__ = ["patchify", "pixel_targets", "unpatchify"]


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, N, p*p*C)``, patches in row-major order, pixels ordered (row, col, channel)."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3,
               grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, N, p*p*C) -> (B, C, H, W)`` on the ``(h, w)`` patch ``grid``
    (default: square)."""
    B, N, _ = patches.shape
    h, w = grid if grid is not None else (int(math.isqrt(N)),) * 2
    if h * w != N:
        raise ValueError(f"unpatchify: {N} patches do not fill a {h}x{w} grid (pass grid= for a rectangle)")
    p = patch_size
    x = patches.reshape(B, h, w, p, p, channels)  # (B, h, w, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(B, channels, h * p, w * p)


def pixel_targets(images: torch.Tensor, patch_size: int, norm_pix: bool) -> torch.Tensor:
    """``(B, N, p*p*3)`` reconstruction targets: patch pixels, optionally normalised per patch (unbiased
    variance + 1e-6, as the official ``forward_loss``)."""
    target = patchify(images.float(), patch_size)  # (B, N, p*p*3)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    return target
