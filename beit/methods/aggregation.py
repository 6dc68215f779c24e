"""Patch aggregation (BEiT v2, arXiv 2208.06366, Sec. 2.3): a shallow head that makes [CLS] gather the image.

The final [CLS] token (before the final norm) is concatenated with the patch tokens of an intermediate
block ``l`` and passed through ``depth`` (2) extra transformer blocks; their patch outputs go through the
backbone's final norm and its (shared) MIM head, and predict the visual tokens at the masked positions with
their own cross-entropy, added to the main MIM loss. The head's patch tokens carry only what block ``l``
knew, so its loss falls by putting information about the image into the final [CLS]: the linear probe on
[CLS] rises (the paper's ablation). The head is dropped after pretraining: it is a submodule of the
method, not of the backbone, so it is trained and checkpointed but never part of what ``beit.load`` returns.
Official layout: ``VisionTransformerForMaskedImageModelingCLS`` (``early_layers=9, head_layers=2`` for ViT-B).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ConfigError
from ..models.vit import Block, VisionTransformer, num_relative_distance

__all__ = ["PatchAggregationHead", "aggregation_block"]


def aggregation_block(block: int | None, depth: int) -> int:
    """The 0-based block whose patch tokens feed the head: ``block`` (negative from the end), or three
    quarters of the depth (the paper's 9th of 12 blocks) when ``None``. Must leave a later block."""
    b = int(depth * 3 / 4) - 1 if block is None else block
    if not -depth <= b < depth or b % depth == depth - 1:
        raise ConfigError(f"beit.patch_aggregation_block={block} must name a block before the last of {depth} "
                          f"(0..{depth - 2})")
    return b % depth


class PatchAggregationHead(nn.Module):
    """``depth`` transformer blocks shaped like the backbone's: ``forward(cls (B, 1, D), patches (B, N, D))``
    -> ``(B, N, D)`` patch outputs (before the final norm)."""

    def __init__(self, model: VisionTransformer, block: int, depth: int = 2) -> None:
        super().__init__()
        cfg = model.cfg
        self.block = block
        n_layers = len(model.blocks)
        per_layer = num_relative_distance(model.grid_size) if cfg.use_rel_pos_bias else 0
        # stochastic depth continues the backbone's linear rule from block ``block + 1`` on
        rates = [cfg.drop_path_rate * min(block + 1 + i, n_layers - 1) / max(n_layers - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(cfg, rates[i], per_layer) for i in range(depth))
        self._init(cfg.init_std)

    @torch.no_grad()
    def _init(self, std: float) -> None:
        """The backbone's init (official ``fix_init_cls_pt_weight``: output projections of layer ``block + 2 + i``
        scaled by ``1/sqrt(2 (block + 2 + i))``)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for i, blk in enumerate(self.blocks):
            layer = self.block + 2 + i
            blk.attn.proj.weight.div_(math.sqrt(2.0 * layer))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))

    def forward(self, cls: torch.Tensor, patches: torch.Tensor, shared: torch.Tensor | None,
                index: torch.Tensor | None) -> torch.Tensor:
        x = torch.cat((cls, patches), dim=1)  # (B, 1+N, D)
        for blk in self.blocks:
            x = blk(x, shared, index)
        return x[:, 1:]  # (B, N, D)
