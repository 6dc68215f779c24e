"""Semantic segmentation heads on a plain ViT (BEiT, arXiv 2106.08254, Sec. 3.2 and Appendix D).

- :class:`FeaturePyramid`: BEiT's multi-scale adapter. Four block outputs ``(B, D, h, w)`` (patch grid,
  stride 16 for 16 px patches) become four scales: 4x (two stride-2 transposed convolutions with
  BatchNorm + GELU between), 2x (one transposed convolution), 1x (identity) and 0.5x (2x2 max-pool),
  i.e. strides 4, 8, 16, 32 as for a CNN backbone (official ``beit.py`` of the segmentation code: fpn1..4).
- :class:`UperNetHead`: UperNet (Xiao et al. 2018, mmseg ``UPerHead``): a pyramid pooling module (PPM,
  pool sizes 1, 2, 3, 6) on the coarsest level, FPN laterals + top-down sums + 3x3 convs, all levels
  upsampled to the finest, concatenated, fused by a 3x3 conv, dropout 0.1, 1x1 classifier.
- :class:`FCNHead`: the auxiliary head of the official config (one 3x3 conv on the third level, loss
  weight 0.4).
- :class:`PUPHead`: SETR-PUP (Zheng et al. 2021): the last block's LayerNorm-ed tokens, four rounds of
  3x3 conv + BN + ReLU + 2x bilinear upsampling, 1x1 classifier.

Every head returns logits at its own resolution; the task upsamples them to the input size.
No parameter here is named like a backbone part (``blocks``, ``patch_embed``...), so layer-wise lr decay
gives the heads the full learning rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FCNHead", "FeaturePyramid", "PUPHead", "UperNetHead", "tokens_to_map"]


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, 1+N, D)`` with [CLS] first -> ``(B, D, h, w)`` patch feature map."""
    B, T, D = tokens.shape
    h, w = grid
    return tokens[:, 1:].transpose(1, 2).reshape(B, D, h, w)  # (B, D, N) -> (B, D, h, w)


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FeaturePyramid(nn.Module):
    """Four ``(B, D, h, w)`` maps -> ``[(B, D, 4h, 4w), (B, D, 2h, 2w), (B, D, h, w), (B, D, h/2, w/2)]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
                                 nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.keep = nn.Identity()
        self.down2 = nn.MaxPool2d(2, stride=2)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(maps) != 4:
            raise ValueError(f"the feature pyramid takes 4 maps, got {len(maps)}")
        return [op(x) for op, x in zip((self.up4, self.up2, self.keep, self.down2), maps)]


class PPM(nn.Module):
    """Pyramid pooling (PSPNet): average-pool to s x s for each scale, 1x1 conv, upsample back."""

    def __init__(self, cin: int, channels: int, scales: Sequence[int]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(cin, channels, 1))
                                    for s in scales)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        size = x.shape[-2:]
        return [F.interpolate(st(x), size=size, mode="bilinear", align_corners=False) for st in self.stages]


class UperNetHead(nn.Module):
    """UperNet over four levels (finest first) of ``in_dim`` channels -> ``(B, num_classes, H4, W4)``."""

    def __init__(self, in_dim: int, num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        self.ppm = PPM(in_dim, channels, pool_scales)
        self.ppm_bottleneck = conv_bn_relu(in_dim + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(in_dim, channels, 1) for _ in range(3))
        self.fpn_out = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(3))
        self.fuse = conv_bn_relu(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        lat = [lc(f) for lc, f in zip(self.lateral, feats[:-1])]
        lat.append(self.ppm_bottleneck(torch.cat([top, *self.ppm(top)], dim=1)))  # (B, C, h/2, w/2)
        for i in range(len(lat) - 1, 0, -1):  # top-down: add the coarser level, upsampled
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="bilinear",
                                                    align_corners=False)
        outs = [conv(x) for conv, x in zip(self.fpn_out, lat[:-1])] + [lat[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        x = self.fuse(torch.cat(outs, dim=1))  # (B, C, 4h, 4w)
        return self.classifier(self.dropout(x))


class FCNHead(nn.Module):
    """Auxiliary head: 3x3 conv + BN + ReLU, dropout, 1x1 classifier on one level."""

    def __init__(self, in_dim: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_dim, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class PUPHead(nn.Module):
    """SETR progressive upsampling: LayerNorm-ed last-block tokens ``(B, 1+N, D)`` -> ``(B, classes, 16h, 16w)``."""

    def __init__(self, in_dim: int, num_classes: int, channels: int = 256, num_up: int = 4,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, eps=1e-6)
        self.convs = nn.ModuleList(conv_bn_relu(in_dim if i == 0 else channels, channels, 3) for i in range(num_up))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = tokens_to_map(self.norm(tokens), grid)  # (B, D, h, w)
        for conv in self.convs:
            x = F.interpolate(conv(x), scale_factor=2, mode="bilinear", align_corners=False)
        return self.classifier(self.dropout(x))
