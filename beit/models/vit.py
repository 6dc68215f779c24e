"""THE vision transformer of BEiT (arXiv 2106.08254, Sec. 2.2 and Appendix), one file.

Parameter names follow the official BEiT code and timm (``patch_embed.proj``, ``blocks.{i}.attn.qkv``,
``gamma_1``, ``rel_pos_bias.relative_position_bias_table``, ``fc_norm``, ``head``, ``lm_head``, ...), so their
state dicts load without renaming; :mod:`beit.interop` maps HF transformers names.

Conventions: images ``(B, C, H, W)``, square or not (``img_size`` = (H, W): an ``h x w`` patch grid); masks are ``bool`` with **True = masked**, shape ``(B, h, w)`` or
``(B, N)`` in row-major patch order; token sequences are ``(B, 1 + N, D)`` with [CLS] first.

Why one file of ~600 lines: it is the one backbone every method, task and export shares (patch embedding,
attention with its relative-position bias, block, the ViT and its heads); split, a reader following one
forward pass would cross files at every call, and the parameter names above are one contract.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from beit.config import ConfigError, ModelConfig, image_hw

# --------------------------------------------------------------------------------------------- helpers


def _trunc_normal_(t: torch.Tensor, std: float) -> None:
    """Normal(0, std) truncated at two standard deviations, by inverse-CDF sampling.

    Two std is the timm convention; the official pretraining code truncates at one std, which at std 0.02
    is invisible after a few hundred steps. Inverse CDF rather than ``nn.init.trunc_normal_``, whose
    rejection sampling takes tens of seconds for a base model on a small CPU.
    """
    bound = math.erf(2.0 / math.sqrt(2.0))  # 2 * Phi(2) - 1
    with torch.no_grad():
        t.uniform_(-bound, bound).erfinv_().mul_(std * math.sqrt(2.0)).clamp_(-2 * std, 2 * std)


def num_relative_distance(grid: tuple[int, int]) -> int:
    """Rows of a relative position table: every 2D offset plus 3 [CLS] entries (cls->tok, tok->cls, cls->cls)."""
    h, w = grid
    return (2 * h - 1) * (2 * w - 1) + 3


def relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """``(1+N, 1+N)`` long: row of the relative position table for each (query, key) pair, [CLS] first.

    Patch offsets (dy, dx) map to ``(dy + h - 1) * (2w - 1) + (dx + w - 1)``; the last three rows of the
    table are [CLS]->patch, patch->[CLS] and [CLS]->[CLS] (official BEiT / timm / HF layout).
    """
    h, w = grid
    n = h * w
    nrd = num_relative_distance(grid)
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    idx = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)  # (N, N)
    index = torch.zeros(n + 1, n + 1, dtype=torch.long)
    index[1:, 1:] = idx
    index[0, :] = nrd - 3  # [CLS] -> patch
    index[:, 0] = nrd - 2  # patch -> [CLS]
    index[0, 0] = nrd - 1  # [CLS] -> [CLS]
    return index


def gather_relative_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Bias for attention logits from a ``(num_rel, heads)`` table.

    ``index`` is ``(T, T)`` (all tokens) or ``(B, T, T)`` (a per-sample subset, MAE); returns
    ``(1, heads, T, T)`` or ``(B, heads, T, T)``.
    """
    bias = table[index]  # (T, T, H) or (B, T, T, H)
    if index.dim() == 2:
        return bias.permute(2, 0, 1).unsqueeze(0).contiguous()  # (1, H, T, T)
    return bias.permute(0, 3, 1, 2).contiguous()  # (B, H, T, T)


def sincos_pos_embed(embed_dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding ``(1, 1+N, D)`` with a zero row for [CLS] (MAE, arXiv 2111.06377).

    Half of the channels encode the column and half the row, each as [sin, cos] of ``pos / 10000^(2i/d)``,
    in the same channel order as the MAE code so its checkpoints agree.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    h, w = grid
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    omega = torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4.0)
    omega = 1.0 / 10000**omega  # (D/4,)

    def enc(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]  # (N, D/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (N, D/2)

    emb = torch.cat([enc(gx), enc(gy)], dim=1)  # (N, D): MAE puts the column (w) encoding first
    emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)  # (1+N, D)
    return emb.float().unsqueeze(0)


# Attention with a bias on CUDA: SDPA by default. With a bias that needs its gradient (BEiT's relative position
# bias), PyTorch dispatches SDPA to its memory-efficient kernel, which is fused and returns the bias gradient: on
# an H100 (docs/notebook/2026-11-gpu-check-h100.md, bench/attention_kernels.py) it is as exact as FlexAttention
# in bf16 and 1.8x faster forward + backward at the base shape (0.97 vs 1.72 ms). FlexAttention (a score
# modifier adding the bias) stays opt-in with BEIT_FLEX_ATTENTION=1.
USE_FLEX = os.environ.get("BEIT_FLEX_ATTENTION", "0") == "1"
_flex_state: dict = {}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """``softmax(q k^T / sqrt(hd) + bias) v`` for ``q, k, v (B, H, T, hd)``, ``bias (1|B, H, T, T)`` or None.

    On CUDA this is ``F.scaled_dot_product_attention``; with a bias that needs its gradient PyTorch runs it in
    the memory-efficient kernel, fused, bias gradient included (FlexAttention with ``BEIT_FLEX_ATTENTION=1``).
    On CPU, in bf16 or with a bias (and without attention dropout), it is the formula written out
    (:func:`_explicit_attention`, faster there); elsewhere SDPA.
    """
    if bias is not None and dropout_p == 0.0 and q.is_cuda and USE_FLEX:
        flex = _compiled_flex()
        if flex is not None:
            try:
                return _flex_with_bias(flex, q, k, v, bias)
            except Exception as e:  # noqa: BLE001 - e.g. no Triton/compiler here: SDPA from now on
                warnings.warn(f"FlexAttention failed ({type(e).__name__}: {e}); using SDPA", stacklevel=2)
                _flex_state["fn"] = None
    if not q.is_cuda and dropout_p == 0.0 and (bias is not None or q.dtype != torch.float32):
        return _explicit_attention(q, k, v, bias)
    mask = bias.to(q.dtype) if bias is not None else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The attention formula written out, softmax in fp32. On CPU it beats ``scaled_dot_product_attention``
    in bf16 and wherever there is a bias, forward + backward (``bench/attention_cpu.py``, one thread, AMX
    Xeon: 1.4-4.3x in bf16 at the tiny preset's 17-65 tokens, 1.7x at 197 tokens with a bias, 1.0-1.15x in
    fp32 with a bias); SDPA stays for fp32 without a bias, where it is faster (0.7-0.9x)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, T, T)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    return scores.float().softmax(-1).to(v.dtype) @ v


def _compiled_flex():
    """``torch.compile(flex_attention)`` once per process, or None where this torch lacks it."""
    if "fn" not in _flex_state:
        _flex_state["fn"] = None
        major, minor = (int(x) for x in torch.__version__.split(".")[:2])
        if (major, minor) >= (2, 7):
            try:
                from torch.nn.attention.flex_attention import flex_attention

                _flex_state["fn"] = torch.compile(flex_attention)
            except Exception:  # noqa: BLE001 - an optional fused kernel; SDPA is always there
                _flex_state["fn"] = None
    return _flex_state["fn"]


def _flex_with_bias(flex, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # the bias in the inputs' dtype, as SDPA takes it: an fp32 bias with bf16 inputs makes Triton's backward
    # kernel ask for more shared memory than an H100 has (245,760 of 232,448 bytes;
    # docs/notebook/2026-11-gpu-check-h100.md)
    bias = bias.to(q.dtype)
    if bias.shape[0] == 1:  # shared over the batch: (1, H, T, T)
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[0, h, q_idx, kv_idx]
    else:  # per sample (MAE's visible subset): (B, H, T, T)
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, h, q_idx, kv_idx]
    return flex(q, k, v, score_mod=score_mod)


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016): drop the residual branch with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# --------------------------------------------------------------------------------------------- modules


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches -> ``(B, N, D)`` by one strided convolution.

    ``img_size``: one side (square) or ``(height, width)``; the grid is ``(height, width) // patch_size``."""

    def __init__(self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.img_hw = image_hw(img_size)
        self.patch_size = patch_size
        self.grid_size = (self.img_hw[0] // patch_size, self.img_hw[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor, any_size: bool = False) -> torch.Tensor:
        """``(B, C, H, W) -> (B, N, D)``; another ``(H, W)`` than the model's only with ``any_size``
        (multiples of the patch size)."""
        other = x.dim() == 4 and tuple(x.shape[-2:]) != self.img_hw
        if any_size and other and all(s % self.patch_size == 0 for s in x.shape[-2:]):
            other = False
        if x.dim() != 4 or other:
            raise ValueError(
                f"expected images (B, C, {self.img_hw[0]}, {self.img_hw[1]}), got {tuple(x.shape)}; "
                "load the model at this resolution (beit.load(path, img_size=...))"
            )
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)


class RelativePositionBias(nn.Module):
    """The relative position table shared by all layers (BEiT pretraining, Sec. 2.2)."""

    def __init__(self, num_rel: int, num_heads: int) -> None:
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_rel, num_heads))

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return gather_relative_bias(self.relative_position_bias_table, index)


class Attention(nn.Module):
    """Multi-head self-attention; q and v have biases, k none (a k bias cancels in the softmax)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float,
                 num_rel: int = 0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_rel, num_heads)) if num_rel else None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        rel_index: torch.Tensor | None = None,
        return_attn: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``x (B, T, D)``; ``bias`` broadcastable to ``(B, heads, T, T)`` is added to the logits."""
        B, T, D = x.shape
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias)  # (B, T, 3D)
        q, k, v = qkv.reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        if self.relative_position_bias_table is not None:
            own = gather_relative_bias(self.relative_position_bias_table, rel_index)  # (1|B, H, T, T)
            bias = own if bias is None else bias + own
        drop = self.attn_drop if self.training else 0.0
        attn = None
        if return_attn:  # explicit softmax: only when the caller wants the attention maps
            logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, T, T)
            if bias is not None:
                logits = logits + bias
            attn = logits.float().softmax(dim=-1).to(q.dtype)
            out = F.dropout(attn, drop, self.training) @ v  # (B, H, T, hd)
        else:
            out = attention(q, k, v, bias, drop)  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, T, H, hd) -> (B, T, D)
        out = self.proj_drop(self.proj(out))
        return (out, attn) if return_attn else out


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-LN transformer block with LayerScale (``gamma_1``, ``gamma_2``; CaiT) and stochastic depth."""

    def __init__(self, cfg: ModelConfig, drop_path: float, num_rel: int) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, cfg.attn_drop_rate, cfg.drop_rate, num_rel)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.drop_rate)
        if cfg.layer_scale_init > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(cfg.layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(cfg.layer_scale_init)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        rel_index: torch.Tensor | None = None,
        return_attn: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        y = self.attn(self.norm1(x), bias, rel_index, return_attn)
        attn = None
        if return_attn:
            y, attn = y
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        x = x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)
        return (x, attn) if return_attn else x


# --------------------------------------------------------------------------------------------- the model


def grid_pool(patches: torch.Tensor, grid_hw: tuple[int, int], grid: int) -> torch.Tensor:
    """Patch tokens ``(B, h*w, D)`` in row-major order -> ``(B, D*grid*grid)``: the ``(h, w)`` map averaged
    over ``grid`` x ``grid`` cells (adaptive, any map size), channel-major like a pooled convolutional map.
    The layout-keeping pooling of the grid classifier (``model.head_grid``) and of ``beit probe --pool grid``."""
    B, _, D = patches.shape
    fmap = patches.transpose(1, 2).reshape(B, D, *grid_hw)  # (B, D, h, w)
    return F.adaptive_avg_pool2d(fmap, grid).flatten(1)


def uses_fc_norm(cfg: ModelConfig) -> bool:
    """Whether the LayerNorm sits after pooling (``fc_norm``) instead of on every token (``norm``).

    Official fine-tuning layout (mean pooling with a classifier): ``norm`` is Identity and ``fc_norm`` a
    LayerNorm. Pretraining models (MIM head, MAE/iBOT encoders) keep the per-token ``norm``.
    ``cfg.use_fc_norm`` forces either layout (HF ``BeitModel`` / headless timm models with mean pooling).
    """
    if cfg.use_fc_norm is not None:
        return bool(cfg.use_fc_norm)
    return cfg.use_mean_pooling and cfg.num_classes > 0 and cfg.vocab_size == 0


class VisionTransformer(nn.Module):
    """BEiT ViT: patch embedding, [CLS], optional [MASK], absolute and/or relative positions, pre-LN blocks.

    Heads: ``head`` (classification, after mean pooling + ``fc_norm`` or [CLS] + ``norm``) when
    ``num_classes > 0``; ``lm_head`` (visual-token prediction, BEiT Eq. 1) when ``vocab_size > 0``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.embed_dim = self.num_features = D
        self.num_heads = cfg.num_heads
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, D)
        self.grid_size = self.patch_embed.grid_size
        n = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        has_mask = cfg.vocab_size > 0 or cfg.use_mask_token
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D)) if has_mask else None
        if cfg.use_sincos_pos_emb:  # fixed, but saved with the weights (MAE checkpoints carry it too)
            self.register_buffer("pos_embed", sincos_pos_embed(D, self.grid_size))
        elif cfg.use_abs_pos_emb:
            self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, D))
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(cfg.drop_rate)

        nrd = num_relative_distance(self.grid_size)
        self.rel_pos_bias = RelativePositionBias(nrd, cfg.num_heads) if cfg.use_shared_rel_pos_bias else None
        if cfg.use_shared_rel_pos_bias or cfg.use_rel_pos_bias:
            self.register_buffer("rel_pos_index", relative_position_index(self.grid_size), persistent=False)
        else:
            self.rel_pos_index = None

        last = max(cfg.depth - 1, 1)
        dpr = [cfg.drop_path_rate * i / last for i in range(cfg.depth)]  # linear in depth, 0 at block 0
        per_layer = nrd if cfg.use_rel_pos_bias else 0
        self.blocks = nn.ModuleList(Block(cfg, dpr[i], per_layer) for i in range(cfg.depth))

        fc = uses_fc_norm(cfg)
        self.norm = nn.Identity() if fc else nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.fc_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps) if fc else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        head_in = D * cfg.head_grid**2 if cfg.head_grid else D
        self.head = nn.Linear(head_in, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.lm_head = nn.Linear(D, cfg.vocab_size) if cfg.vocab_size > 0 else None
        self.init_weights()

    # ----------------------------------------------------------------------------------------- init

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official BEiT init: trunc-normal(std) linears and tokens, zero biases and relative tables,
        then ``fix_init_weight`` and a down-scaled classification head."""
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                _trunc_normal_(m.weight, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        _trunc_normal_(self.cls_token, std)
        if self.mask_token is not None:
            _trunc_normal_(self.mask_token, std)
        if isinstance(self.pos_embed, nn.Parameter):
            _trunc_normal_(self.pos_embed, std)
        # Rescale the output projections of layer l (1-based) by 1/sqrt(2l) (official `fix_init_weight`).
        for i, blk in enumerate(self.blocks):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))
        if isinstance(self.head, nn.Linear):
            self.head.weight.mul_(self.cfg.head_init_scale)
            self.head.bias.mul_(self.cfg.head_init_scale)

    # ----------------------------------------------------------------------------------------- API

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def no_weight_decay(self) -> set[str]:
        """Position tables and special tokens; biases and norms are excluded by the optimiser (ndim <= 1)."""
        names = {"cls_token"}
        if self.pos_embed is not None:
            names.add("pos_embed")
        if self.mask_token is not None:
            names.add("mask_token")
        for name, _ in self.named_parameters():
            if name.endswith("relative_position_bias_table"):
                names.add(name)
        return names

    @torch.no_grad()
    def copy_shared_rel_pos_bias_to_layers(self) -> None:
        """Give every block its own copy of the shared table (fine-tuning from a BEiT pretrained model).

        A block that already has a table gets ``own + shared``, so the function computed is unchanged.
        """
        if self.rel_pos_bias is None:
            return
        shared = self.rel_pos_bias.relative_position_bias_table
        for blk in self.blocks:
            own = blk.attn.relative_position_bias_table
            table = shared.detach().clone() if own is None else own.detach() + shared.detach()
            blk.attn.relative_position_bias_table = nn.Parameter(table)
        self.rel_pos_bias = None
        self.cfg = dataclasses.replace(self.cfg, use_shared_rel_pos_bias=False, use_rel_pos_bias=True)

    def pos_embed_for(self, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """The absolute position table ``(1, 1+h*w, D)`` for another patch grid ``(h, w)``: the patch part
        resized bicubically (DINO's ``interpolate_pos_encoding``), [CLS]'s entry as it is."""
        h, w = self.patch_embed.grid_size
        D = self.pos_embed.shape[-1]
        table = self.pos_embed[:, 1:].reshape(1, h, w, D).permute(0, 3, 1, 2)  # (1, D, h, w)
        table = F.interpolate(table.float(), size=grid, mode="bicubic", align_corners=False)  # (1, D, h', w')
        return torch.cat((self.pos_embed[:, :1], table.permute(0, 2, 3, 1).reshape(1, -1, D).to(dtype)), dim=1)

    def _embed(
        self,
        x: torch.Tensor,
        bool_masked_pos: torch.Tensor | None,
        ids_keep: torch.Tensor | None,
        any_size: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Tokens ``(B, 1+L, D)`` ready for the blocks, the shared bias and the relative index to use."""
        grid = (x.shape[-2] // self.patch_embed.patch_size, x.shape[-1] // self.patch_embed.patch_size)
        resized = any_size and grid != self.patch_embed.grid_size
        if resized and self.rel_pos_index is not None:
            raise ConfigError("images at another resolution need absolute positions: set "
                              "model.use_shared_rel_pos_bias=false, model.use_rel_pos_bias=false and "
                              "model.use_abs_pos_emb=true (or use_sincos_pos_emb=true)")
        x = self.patch_embed(x, any_size=any_size)  # (B, N, D)
        B, N, D = x.shape
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("bool_masked_pos given but the model has no [MASK] embedding "
                                 "(set model.vocab_size > 0 or model.use_mask_token=true)")
            # Replace masked patch embeddings by [MASK] before positions are added (official BEiT).
            w = bool_masked_pos.reshape(B, N).unsqueeze(-1).to(x.dtype)  # (B, N, 1)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat((self.cls_token.expand(B, -1, -1).to(x.dtype), x), dim=1)  # (B, 1+N, D)
        if self.pos_embed is not None:
            x = x + (self.pos_embed_for(grid, x.dtype) if resized else self.pos_embed)
        index = self.rel_pos_index  # (1+N, 1+N) or None
        if ids_keep is not None:  # MAE: the encoder sees only the kept patches
            keep = torch.cat((ids_keep.new_zeros(B, 1), ids_keep + 1), dim=1)  # (B, 1+L), [CLS] first
            x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, D))  # (B, 1+L, D)
            if index is not None:
                index = index[keep[:, :, None], keep[:, None, :]]  # (B, 1+L, 1+L)
        x = self.pos_drop(x)
        shared = self.rel_pos_bias(index) if self.rel_pos_bias is not None else None  # (1|B, H, T, T)
        return x, shared, index

    def forward_features(
        self,
        x: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        ids_keep: torch.Tensor | None = None,
        any_size: bool = False,
    ) -> torch.Tensor:
        """``x (B, C, H, W)`` -> ``(B, 1+L, D)`` after the final ``norm``.

        ``bool_masked_pos`` ``(B, h, w)`` or ``(B, N)``, True = masked: those patches become [MASK].
        ``ids_keep`` ``(B, L)`` long: keep only these patches (MAE encoder); L = N when not given.
        ``any_size``: ``(H, W)`` may differ from the model's (iBOT's local crops); the absolute position
        table is resized to the grid (:meth:`pos_embed_for`); relative position tables are refused.
        """
        x, shared, index = self._embed(x, bool_masked_pos, ids_keep, any_size)
        for blk in self.blocks:
            x = blk(x, shared, index)
        return self.norm(x)

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int],
        bool_masked_pos: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Outputs ``(B, 1+N, D)`` of the blocks named by ``indices`` (an int n: the last n), no final norm."""
        L = len(self.blocks)
        wanted_in = list(range(L - indices, L)) if isinstance(indices, int) else list(indices)
        if not wanted_in or any(i < -L or i >= L for i in wanted_in):
            raise ValueError(f"block indices {indices!r} out of range for depth {L}")
        wanted = sorted({i % L for i in wanted_in})
        x, shared, index = self._embed(x, bool_masked_pos, None)
        outs = []
        for i, blk in enumerate(self.blocks[: wanted[-1] + 1]):
            x = blk(x, shared, index)
            if i in wanted:
                outs.append(x)
        return outs

    def get_attention(self, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """Softmax attention ``(B, heads, 1+N, 1+N)`` of block ``layer`` (rows sum to 1)."""
        layer = layer % len(self.blocks)
        x, shared, index = self._embed(x, None, None)
        for blk in self.blocks[:layer]:
            x = blk(x, shared, index)
        _, attn = self.blocks[layer](x, shared, index, return_attn=True)
        return attn

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, 1+L, D)`` -> ``(B, num_classes)``: mean of patch tokens + ``fc_norm``, or [CLS]; with
        ``head_grid`` G: the patch tokens through ``fc_norm``, averaged over a G x G grid, flattened ``(B, D*G*G)``."""
        if self.cfg.head_grid:
            patches = self.fc_norm(tokens[:, 1:])  # (B, N, D)
            x = self.head_drop(grid_pool(patches, self.patch_embed.grid_size, self.cfg.head_grid))  # (B, D*G*G)
            return x if pre_logits else self.head(x)
        x = tokens[:, 1:].mean(dim=1) if self.cfg.use_mean_pooling else tokens[:, 0]  # (B, D)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward_mim(self, x: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Visual-token logits ``(num_masked, vocab_size)`` at the masked positions (True = masked), in the
        row-major order of the mask. The head runs on masked tokens only (BEiT Eq. 1)."""
        if self.lm_head is None:
            raise ValueError("forward_mim needs an MIM head: set model.vocab_size > 0")
        tokens = self.forward_features(x, bool_masked_pos)  # (B, 1+N, D)
        B, T, D = tokens.shape
        masked = tokens[:, 1:][bool_masked_pos.reshape(B, T - 1)]  # (num_masked, D)
        return self.lm_head(masked)

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, H, W)`` -> the pooled embedding ``(B, D)`` the head would see: mean of the patch tokens
        (+ ``fc_norm`` where the model has one) or the normalised [CLS], as ``use_mean_pooling`` says."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Classification logits if ``num_classes > 0``; else MIM logits if a mask is given; else the pooled
        embedding ``(B, D)`` for a classifier layout without its head (``fc_norm``: a fine-tuned model loaded
        with ``num_classes=0``, HF ``BeitModel``), as timm's ``num_classes=0``; else the tokens ``(B, 1+N, D)``."""
        if self.cfg.num_classes > 0:
            return self.forward_head(self.forward_features(x, bool_masked_pos))
        if bool_masked_pos is None and uses_fc_norm(self.cfg):
            return self.forward_pooled(x)
        if bool_masked_pos is not None and self.lm_head is not None:
            return self.forward_mim(x, bool_masked_pos)
        return self.forward_features(x, bool_masked_pos)


__all__ = [
    "VisionTransformer",
    "gather_relative_bias",
    "grid_pool",
    "num_relative_distance",
    "relative_position_index",
    "sincos_pos_embed",
    "uses_fc_norm",
]
