"""Weights to and from HF transformers, timm and the official BEiT code (microsoft/unilm).

Our parameter names are the official/timm ones, so official and timm state dicts need only their
buffers dropped; HF transformers names are mapped here, both its on-disk layout (``beit.encoder.layer.{i}
.attention.attention.query``, what ``save_pretrained`` writes and the Hub holds) and its v5 in-memory layout
(``beit.layers.{i}.attention.q_proj``). Nothing here imports ``transformers`` or ``timm``.

Entry points: :func:`load_any` (path -> model), :func:`export` (model -> folder in ``hf`` or ``timm``
format), :func:`resize_pos_and_rel_tables` (load at another resolution).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from beit.checkpoint_io import (
    CheckpointError,
    file_digest,
    load_weights,
    read_json,
    read_torch_file,
    removed_on_failure,
    save_weights,
    write_safetensors,
)
from beit.config import ConfigError, ModelConfig, from_dict, to_dict
from beit.models.vit import VisionTransformer, num_relative_distance, uses_fc_norm

log = logging.getLogger(__name__)

_REL = "relative_position_bias_table"
_SKIP = re.compile(r"(relative_position_index|k_bias|num_batches_tracked)$")

# --------------------------------------------------------------------------------------------- resizing


def _grid_of_rel_table(rows: int) -> int:
    side = math.isqrt(rows - 3)  # (2h - 1)^2 = rows - 3 for a square grid
    if side * side != rows - 3 or side % 2 == 0:
        raise CheckpointError(f"relative position table with {rows} rows is not (2h-1)^2 + 3 for a square grid")
    return (side + 1) // 2


def _source_grid(n: int, new_grid: tuple[int, int], old_grid: tuple[int, int] | None,
                 of_rows: bool) -> tuple[int, int]:
    """The grid a table of ``n`` rows (relative) or patches (absolute) was made for: ``old_grid`` if given,
    the new grid if the size matches it (nothing to resize), else a square one."""
    if old_grid is not None:
        return tuple(old_grid)  # type: ignore[return-value]
    fits_new = (num_relative_distance(new_grid) if of_rows else new_grid[0] * new_grid[1]) == n
    if fits_new:
        return tuple(new_grid)  # type: ignore[return-value]
    if of_rows:
        side = _grid_of_rel_table(n)
    else:
        side = math.isqrt(n)
        if side * side != n:
            raise CheckpointError(f"position embedding with {n} patches is not a square grid")
    return (side, side)


def resize_rel_table(table: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None,
                     mode: str = "bicubic") -> torch.Tensor:
    """``(num_rel, heads)`` table for another grid ``(h', w')``, square or not: the ``(2h-1, 2w-1)`` grid of
    offsets resampled (``mode``: bicubic, or bilinear as HF transformers' ``interpolate_pos_encoding``) to
    ``(2h'-1, 2w'-1)``, the 3 [CLS] rows kept as they are (the official code uses scipy's
    geometric-progression interpolation; a bicubic resample is its torch-only equivalent for the smooth
    tables BEiT learns). ``old_grid``: the table's grid when it is not square."""
    old_h, old_w = _source_grid(table.shape[0], tuple(new_grid), old_grid, of_rows=True)
    new_h, new_w = new_grid
    if (old_h, old_w) == (new_h, new_w):
        return table
    heads = table.shape[1]
    grid = table[:-3].T.reshape(1, heads, 2 * old_h - 1, 2 * old_w - 1).float()  # (1, H, 2h-1, 2w-1)
    grid = F.interpolate(grid, size=(2 * new_h - 1, 2 * new_w - 1), mode=mode, align_corners=False)
    rows = grid.reshape(heads, -1).T.to(table.dtype)  # ((2h'-1)(2w'-1), H)
    return torch.cat([rows, table[-3:]], dim=0)


def resize_pos_embed(pos: torch.Tensor, new_grid: tuple[int, int],
                     old_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """``(1, 1+N, D)`` absolute embedding for another grid ``(h', w')``: bicubic on the patch grid (as HF
    transformers' ``interpolate_pos_encoding``), [CLS] row kept. ``old_grid``: when it is not square."""
    old_h, old_w = _source_grid(pos.shape[1] - 1, tuple(new_grid), old_grid, of_rows=False)
    if (old_h, old_w) == tuple(new_grid):
        return pos
    D = pos.shape[-1]
    grid = pos[:, 1:].reshape(1, old_h, old_w, D).permute(0, 3, 1, 2).float()  # (1, D, h, w)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos.dtype)  # (1, h'w', D)
    return torch.cat([pos[:, :1], grid], dim=1)


def resize_pos_and_rel_tables(state_dict: dict[str, torch.Tensor], new_grid: tuple[int, int],
                              old_grid: tuple[int, int] | None = None,
                              rel_mode: str = "bicubic") -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` (our names) with ``pos_embed`` and every relative position table resized to
    ``new_grid`` patches (rows, columns); sizes that already match are returned unchanged (resizing to the
    same size is the identity). Tables are taken as square unless ``old_grid`` says otherwise;
    ``rel_mode`` resamples the relative tables (bilinear: as HF transformers)."""
    out = dict(state_dict)
    for k, v in state_dict.items():
        if k == "pos_embed":
            out[k] = resize_pos_embed(v, new_grid, old_grid)
        elif k.endswith(_REL):
            out[k] = resize_rel_table(v, new_grid, old_grid, rel_mode)
    return out


# --------------------------------------------------------------------------------------------- timm / official


def _unwrap(obj: Any) -> tuple[dict[str, torch.Tensor], bool]:
    """The state dict inside a checkpoint object, and whether it came wrapped (official training files)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a state dict, got {type(obj).__name__}")
    for key in ("model", "module", "state_dict", "model_ema"):
        if key in obj and isinstance(obj[key], dict):
            inner, _ = _unwrap(obj[key])
            return inner, True
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError("no tensors found in checkpoint")
    for prefix in ("module.", "encoder.", "model."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd, False


def timm_to_ours(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm / official BEiT state dict -> ours: drop buffers (index tables, the always-zero k bias)."""
    return {k: v for k, v in state_dict.items() if not _SKIP.search(k)}


def ours_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> timm ``Beit``: the MIM head and [MASK] have no place there."""
    return {k: v for k, v in state_dict.items() if not k.startswith(("lm_head.", "mask_token"))}


def infer_config(state_dict: dict[str, torch.Tensor], **overrides: Any) -> ModelConfig:
    """Architecture of an official/timm-named state dict. Heads count as ``head_dim = 64`` (every BEiT size)
    unless a relative table tells them or ``num_heads`` is given."""
    sd = state_dict
    if "patch_embed.proj.weight" not in sd or "cls_token" not in sd:
        raise CheckpointError("not a BEiT/ViT state dict (no patch_embed.proj.weight / cls_token)")
    D, C, p, _ = sd["patch_embed.proj.weight"].shape
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    tables = [v for k, v in sd.items() if k.endswith(_REL)]
    heads = tables[0].shape[1] if tables else max(1, D // 64)
    if "img_size" in overrides:  # given (timm model_args, a non-square size): the tables need not be square
        grid = 0
    elif "pos_embed" in sd:
        grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    elif tables:
        grid = _grid_of_rel_table(tables[0].shape[0])
    else:
        grid = 224 // p
    has_fc = "fc_norm.weight" in sd
    kw: dict[str, Any] = dict(
        img_size=grid * p,
        patch_size=p,
        in_chans=C,
        embed_dim=D,
        depth=depth,
        num_heads=heads,
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D if depth else 4.0,
        qkv_bias="blocks.0.attn.q_bias" in sd,
        layer_scale_init=0.1 if "blocks.0.gamma_1" in sd else 0.0,  # the value is in the weights
        use_abs_pos_emb="pos_embed" in sd,
        use_shared_rel_pos_bias=f"rel_pos_bias.{_REL}" in sd,
        use_rel_pos_bias=f"blocks.0.attn.{_REL}" in sd,
        use_mean_pooling=has_fc or "head.weight" not in sd,
        use_fc_norm=has_fc,
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
        vocab_size=sd["lm_head.weight"].shape[0] if "lm_head.weight" in sd else 0,
        use_mask_token="mask_token" in sd,
        layer_norm_eps=1e-6,
    )
    kw.update(overrides)
    return from_dict(ModelConfig, kw, prefix="model.")


def _no_grid_head(cfg: ModelConfig, lib: str) -> None:
    if cfg.head_grid and cfg.num_classes > 0:
        raise ConfigError(f"{lib} has no grid-pooled classifier (this model has model.head_grid="
                          f"{cfg.head_grid}); load it with num_classes=0 to export the backbone")


def timm_model_args(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model('beit_base_patch16_224', pretrained=False, **args)`` that
    build timm's ``Beit`` with exactly our architecture (timm >= 1.0; any ``beit_*`` name works, the
    arguments override the preset)."""
    if cfg.layer_norm_eps != 1e-6:
        log.warning("timm's Beit uses LayerNorm eps 1e-6; this model uses %g", cfg.layer_norm_eps)
    fc = uses_fc_norm(cfg)
    _no_grid_head(cfg, "timm Beit")
    if fc and not cfg.use_mean_pooling:
        raise ConfigError("timm Beit cannot express fc_norm with [CLS] pooling")
    if not fc and cfg.use_mean_pooling and cfg.num_classes > 0:
        raise ConfigError("timm Beit cannot express mean pooling of normalised tokens without fc_norm")
    return dict(
        img_size=cfg.img_size if isinstance(cfg.img_size, int) else list(cfg.img_hw),
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=cfg.num_classes,
        global_pool="avg" if cfg.use_mean_pooling else "token",
        use_fc_norm=fc,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias,
        init_values=cfg.layer_scale_init if cfg.layer_scale_init > 0 else None,
        use_abs_pos_emb=cfg.use_abs_pos_emb or cfg.use_sincos_pos_emb,  # sin-cos travels as a learned table
        use_rel_pos_bias=cfg.use_rel_pos_bias,
        use_shared_rel_pos_bias=cfg.use_shared_rel_pos_bias,
    )


def _timm_arch(cfg: ModelConfig) -> str:
    size = {192: "tiny", 384: "small", 768: "base", 1024: "large"}.get(cfg.embed_dim, "base")
    if size == "tiny" or size == "small":  # timm registers no tiny/small BEiT; the args define the model
        size = "base"
    res = 384 if cfg.img_size == 384 else 224
    return f"beit_{size}_patch16_{res}"


# --------------------------------------------------------------------------------------------- HF transformers

_HF_NEW_TO_OLD = [  # transformers v5 in-memory names -> the on-disk layout
    (r"(^|\.)layers\.(\d+)\.attention\.q_proj\.", r"\1encoder.layer.\2.attention.attention.query."),
    (r"(^|\.)layers\.(\d+)\.attention\.k_proj\.", r"\1encoder.layer.\2.attention.attention.key."),
    (r"(^|\.)layers\.(\d+)\.attention\.v_proj\.", r"\1encoder.layer.\2.attention.attention.value."),
    (r"(^|\.)layers\.(\d+)\.attention\.o_proj\.", r"\1encoder.layer.\2.attention.output.dense."),
    (r"(^|\.)layers\.(\d+)\.mlp\.fc1\.", r"\1encoder.layer.\2.intermediate.dense."),
    (r"(^|\.)layers\.(\d+)\.mlp\.fc2\.", r"\1encoder.layer.\2.output.dense."),
    (r"(^|\.)layers\.(\d+)\.relative_position_bias\.",
     r"\1encoder.layer.\2.attention.attention.relative_position_bias."),
    (r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2."),
    (r"(^|\.)shared_position_bias\.", r"\1encoder.relative_position_bias."),
]

_HF_LAYER = {  # on-disk HF names inside encoder.layer.{i}. -> ours inside blocks.{i}.
    "attention.attention.relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layernorm_before.weight": "norm1.weight",
    "layernorm_before.bias": "norm1.bias",
    "layernorm_after.weight": "norm2.weight",
    "layernorm_after.bias": "norm2.bias",
    "intermediate.dense.weight": "mlp.fc1.weight",
    "intermediate.dense.bias": "mlp.fc1.bias",
    "output.dense.weight": "mlp.fc2.weight",
    "output.dense.bias": "mlp.fc2.bias",
    "lambda_1": "gamma_1",
    "lambda_2": "gamma_2",
}

_HF_TOP = {  # inside the base model (prefix ``beit.`` in head models)
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "encoder.relative_position_bias.relative_position_bias_table": "rel_pos_bias.relative_position_bias_table",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "pooler.layernorm.weight": "fc_norm.weight",
    "pooler.layernorm.bias": "fc_norm.bias",
}

_HF_ARCHS = ("BeitModel", "BeitForMaskedImageModeling", "BeitForImageClassification")


def hf_config_to_model_config(hf: dict[str, Any], arch: str | None = None, **overrides: Any) -> ModelConfig:
    """HF ``BeitConfig`` (as its config.json dict) -> :class:`ModelConfig` for architecture ``arch``."""
    arch = arch or (hf.get("architectures") or ["BeitModel"])[0]
    if arch not in _HF_ARCHS:
        raise ConfigError(f"HF architecture {arch!r} is not supported; expected one of {', '.join(_HF_ARCHS)}")

    def square(v: Any, key: str) -> int:
        if isinstance(v, (list, tuple)):
            if len(set(v)) != 1:
                raise ConfigError(f"HF {key}={v} is not square")
            v = v[0]
        return int(v)

    hidden = int(hf.get("hidden_size", 768))
    mean_pool = bool(hf.get("use_mean_pooling", True))
    if arch == "BeitForMaskedImageModeling" and not mean_pool:
        raise ConfigError("HF BeitForMaskedImageModeling with use_mean_pooling=false normalises twice; "
                          "this layout is not supported")
    if arch == "BeitForImageClassification":
        labels = hf.get("id2label")
        num_classes = len(labels) if labels else int(hf.get("num_labels", 2))
    else:
        num_classes = 0
    kw: dict[str, Any] = dict(
        img_size=square(hf.get("image_size", 224), "image_size"),
        patch_size=square(hf.get("patch_size", 16), "patch_size"),
        in_chans=int(hf.get("num_channels", 3)),
        embed_dim=hidden,
        depth=int(hf.get("num_hidden_layers", 12)),
        num_heads=int(hf.get("num_attention_heads", 12)),
        mlp_ratio=int(hf.get("intermediate_size", 4 * hidden)) / hidden,
        qkv_bias=True,
        drop_rate=float(hf.get("hidden_dropout_prob", 0.0)),
        attn_drop_rate=float(hf.get("attention_probs_dropout_prob", 0.0)),
        drop_path_rate=float(hf.get("drop_path_rate", 0.1)),
        layer_scale_init=float(hf.get("layer_scale_init_value", 0.1)),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        use_abs_pos_emb=bool(hf.get("use_absolute_position_embeddings", False)),
        use_rel_pos_bias=bool(hf.get("use_relative_position_bias", False)),
        use_shared_rel_pos_bias=bool(hf.get("use_shared_relative_position_bias", False)),
        use_mean_pooling=mean_pool,
        # MIM: the head's LayerNorm is our per-token `norm`; otherwise HF's pooler LayerNorm is `fc_norm`
        use_fc_norm=mean_pool and arch != "BeitForMaskedImageModeling",
        num_classes=num_classes,
        vocab_size=int(hf.get("vocab_size", 8192)) if arch == "BeitForMaskedImageModeling" else 0,
        use_mask_token=bool(hf.get("use_mask_token", False)) or arch == "BeitForMaskedImageModeling",
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    kw.update(overrides)
    return from_dict(ModelConfig, kw, prefix="model.")


def hf_arch_for(cfg: ModelConfig) -> str:
    if cfg.num_classes > 0:
        return "BeitForImageClassification"
    if cfg.vocab_size > 0:
        return "BeitForMaskedImageModeling"
    return "BeitModel"


def model_config_to_hf_config(cfg: ModelConfig, arch: str | None = None) -> dict[str, Any]:
    """:class:`ModelConfig` -> HF ``BeitConfig`` dict (config.json) for ``arch`` (default: by the heads).

    Raises ConfigError for layouts HF cannot express (mean pooling without ``fc_norm`` under a classifier,
    ``fc_norm`` with [CLS] pooling)."""
    arch = arch or hf_arch_for(cfg)
    fc = uses_fc_norm(cfg)
    _no_grid_head(cfg, "HF Beit")
    if not isinstance(cfg.img_size, int):  # HF re-reads its tables as square ones at a non-square size
        raise ConfigError(f"HF Beit supports square models only; this one is {cfg.img_hw[0]}x{cfg.img_hw[1]} "
                          "(export it as timm, or load it at a square img_size first)")
    if arch == "BeitForImageClassification":
        if cfg.num_classes <= 0:
            raise ConfigError("BeitForImageClassification needs model.num_classes > 0")
        if fc != cfg.use_mean_pooling:
            raise ConfigError("HF Beit pools either mean+LayerNorm (fc_norm) or the normalised [CLS]; "
                              f"this model has use_mean_pooling={cfg.use_mean_pooling}, fc_norm={fc}")
        mean_pool = cfg.use_mean_pooling
    elif arch == "BeitForMaskedImageModeling":
        if cfg.vocab_size <= 0 or fc:
            raise ConfigError("BeitForMaskedImageModeling needs model.vocab_size > 0 and a per-token norm")
        mean_pool = True  # makes HF's inner layernorm an Identity; its head LayerNorm is our `norm`
    elif arch == "BeitModel":
        if fc and not cfg.use_mean_pooling:
            raise ConfigError("HF BeitModel cannot express fc_norm with [CLS] pooling")
        mean_pool = fc  # no fc_norm: HF's final layernorm is our `norm`, pooler returns [CLS]
    else:
        raise ConfigError(f"unknown HF architecture {arch!r}; expected one of {', '.join(_HF_ARCHS)}")
    hf: dict[str, Any] = dict(
        architectures=[arch],
        model_type="beit",
        hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio),
        hidden_act="gelu",
        hidden_dropout_prob=cfg.drop_rate,
        attention_probs_dropout_prob=cfg.attn_drop_rate,
        initializer_range=cfg.init_std,
        layer_norm_eps=cfg.layer_norm_eps,
        image_size=cfg.img_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.in_chans,
        use_mask_token=cfg.vocab_size > 0 or cfg.use_mask_token,
        use_absolute_position_embeddings=cfg.use_abs_pos_emb or cfg.use_sincos_pos_emb,
        use_relative_position_bias=cfg.use_rel_pos_bias,
        use_shared_relative_position_bias=cfg.use_shared_rel_pos_bias,
        layer_scale_init_value=cfg.layer_scale_init,
        drop_path_rate=cfg.drop_path_rate,
        use_mean_pooling=mean_pool,
        vocab_size=cfg.vocab_size if cfg.vocab_size > 0 else 8192,
    )
    if arch == "BeitForImageClassification":
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_classes)}
    return hf


def hf_to_ours(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Beit state dict (on-disk or v5 in-memory names, with or without the ``beit.`` prefix) -> ours.

    ``cfg`` is ours (from :func:`hf_config_to_model_config`): it says whether HF's head LayerNorm is our
    ``norm`` (MIM) and splits nothing else."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in state_dict.items():
        k = key
        for pat, rep in _HF_NEW_TO_OLD:
            k = re.sub(pat, rep, k)
        if "relative_position_index" in k:
            continue
        if k.startswith("beit."):
            k = k[len("beit."):]
        elif k.startswith("layernorm."):  # the MIM head's LayerNorm (outside `beit.`)
            out["norm." + k.split(".", 1)[1]] = v
            continue
        elif k.startswith("lm_head."):
            out[k] = v
            continue
        elif k.startswith("classifier."):
            out["head." + k.split(".", 1)[1]] = v
            continue
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)$", k)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            qm = re.match(r"attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
            if qm:
                qkv.setdefault(i, {})[f"{qm.group(1)}.{qm.group(2)}"] = v
            elif rest in _HF_LAYER:
                out[f"blocks.{i}.{_HF_LAYER[rest]}"] = v
            else:
                raise CheckpointError(f"unexpected HF Beit weight {key!r}")
            continue
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
        else:
            raise CheckpointError(f"unexpected HF Beit weight {key!r}")
    for i, p in qkv.items():
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([p["query.weight"], p["key.weight"], p["value.weight"]])
        if cfg.qkv_bias:  # a key bias, if any, shifts every logit of a query equally: softmax ignores it
            out[f"blocks.{i}.attn.q_bias"] = p["query.bias"]
            out[f"blocks.{i}.attn.v_bias"] = p["value.bias"]
    return out


def ours_to_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, arch: str | None = None) -> dict[str, torch.Tensor]:
    """Ours -> HF Beit on-disk names (what ``save_pretrained`` writes, loadable by transformers 4.x and 5.x)."""
    arch = arch or hf_arch_for(cfg)
    base = "" if arch == "BeitModel" else "beit."
    top = {v: k for k, v in _HF_TOP.items()}
    layer = {v: k for k, v in _HF_LAYER.items()}
    D = cfg.embed_dim
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        m = re.match(r"blocks\.(\d+)\.(.+)$", k)
        if m:
            i, rest = m.group(1), m.group(2)
            p = f"{base}encoder.layer.{i}."
            if rest == "attn.qkv.weight":
                q, kk, vv = v.split(D, dim=0)
                out[p + "attention.attention.query.weight"] = q
                out[p + "attention.attention.key.weight"] = kk
                out[p + "attention.attention.value.weight"] = vv
            elif rest == "attn.q_bias":
                out[p + "attention.attention.query.bias"] = v
            elif rest == "attn.v_bias":
                out[p + "attention.attention.value.bias"] = v
            else:
                out[p + layer[rest]] = v
        elif k == "pos_embed":
            out[base + top[k]] = v
        elif k.startswith("norm.") and arch == "BeitForMaskedImageModeling":
            out["layernorm." + k.split(".", 1)[1]] = v
        elif k.startswith("head."):
            if arch == "BeitForImageClassification":
                out["classifier." + k.split(".", 1)[1]] = v
        elif k.startswith("lm_head."):
            if arch == "BeitForMaskedImageModeling":
                out[k] = v
        elif k == "mask_token" and arch == "BeitForImageClassification":
            continue  # HF classification models have no [MASK]
        elif k in top:
            out[base + top[k]] = v
        else:
            raise CheckpointError(f"no HF Beit name for weight {k!r}")
    if not cfg.qkv_bias:  # HF always has q and v biases
        for i in range(cfg.depth):
            p = f"{base}encoder.layer.{i}.attention.attention."
            out[p + "query.bias"] = torch.zeros(D)
            out[p + "value.bias"] = torch.zeros(D)
    return out


def _hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    st = folder / "model.safetensors"
    if st.is_file():
        return load_weights(st)[0]
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        sd: dict[str, torch.Tensor] = {}
        for s in shards:
            sd.update(load_weights(s)[0])
        return sd
    pt = folder / "pytorch_model.bin"
    if pt.is_file():
        return _unwrap(read_torch_file(pt))[0]
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin")


# --------------------------------------------------------------------------------------------- loading


def adapt_state_dict(state_dict: dict[str, torch.Tensor], model: VisionTransformer,
                     old_grid: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Fit a state dict (our names) to ``model``: resize position tables to its grid (from ``old_grid``,
    square by default), spread a shared relative table into per-layer tables (BEiT fine-tuning) or fold
    per-layer ones into a shared one, keep fixed sin-cos tables of the model, and drop heads whose shape no
    longer matches."""
    sd = resize_pos_and_rel_tables(state_dict, model.grid_size, old_grid)
    shared_key = f"rel_pos_bias.{_REL}"
    own = model.state_dict()
    if shared_key in sd and shared_key not in own and f"blocks.0.attn.{_REL}" in own:
        table = sd.pop(shared_key)
        for i in range(model.num_layers):
            k = f"blocks.{i}.attn.{_REL}"
            sd[k] = table.clone() if k not in sd else sd[k] + table
    if model.cfg.use_sincos_pos_emb:
        sd["pos_embed"] = own["pos_embed"]
    for k in list(sd):
        if k in own and sd[k].shape != own[k].shape and k.split(".")[0] in ("head", "lm_head"):
            log.warning("dropping %s: shape %s does not fit the model's %s (new head)", k,
                        tuple(sd[k].shape), tuple(own[k].shape))
            del sd[k]
    return sd


def build_and_load(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], strict: bool = True,
                   old_grid: tuple[int, int] | None = None) -> VisionTransformer:
    """``VisionTransformer(cfg)`` with ``state_dict`` (made for patch grid ``old_grid``, square by default)
    loaded after :func:`adapt_state_dict`, in eval mode.

    ``strict``: every weight must be used and every parameter provided; otherwise mismatches are logged."""
    model = VisionTransformer(cfg)
    sd = adapt_state_dict(state_dict, model, old_grid)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"weights do not fit the model: {e}") from None
    if missing or unexpected:
        msg = f"missing: {sorted(missing)}; unexpected: {sorted(unexpected)}"
        if strict:
            raise CheckpointError("weights do not match the model: " + msg)
        log.warning("loaded with mismatches (kept the model's init for missing ones) - %s", msg)
    return model.eval()


def without_head(saved: ModelConfig, state_dict: dict[str, torch.Tensor],
                 overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor], bool]:
    """``(overrides, state_dict, strict)`` for loading weights saved as ``saved`` with ``overrides``.

    ``num_classes=0`` on a classifier keeps its pooling layout (``fc_norm``, as trained) and drops only the
    head, so every other weight is used and the load stays strict (no warnings); the model then returns its
    pooled features (timm's ``num_classes=0``). Any other override relaxes the check (a fresh head, ...)."""
    if overrides.get("num_classes") != 0 or saved.num_classes == 0:
        return overrides, state_dict, not overrides
    overrides = {"use_fc_norm": uses_fc_norm(saved), **overrides}
    sd = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    return overrides, sd, set(overrides) <= {"num_classes", "use_fc_norm"}


def load_any(path: str | Path, **overrides: Any) -> tuple[str, VisionTransformer]:
    """Load weights in any supported layout -> ``(kind, model)``, kind in ``hf | timm | official | beit``.

    - a folder with an HF ``config.json`` (``model_type: beit``) and model.safetensors / pytorch_model.bin;
    - a folder written by :func:`export_timm` (timm's ``config.json`` with ``model_args``);
    - a ``.safetensors`` file: ours (metadata ``model_config``) or a timm state dict;
    - a ``.pth``/``.pt``/``.bin`` file: official BEiT (``{'model': ...}``) or a timm state dict.

    ``overrides`` change the architecture before loading: ``img_size`` resizes position tables, a new
    ``num_classes`` gets a fresh head, ``use_rel_pos_bias=True, use_shared_rel_pos_bias=False`` copies a
    shared table into every layer. Any override relaxes the check that all weights match.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    strict = not overrides
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{path}: folder without config.json (expected an HF or timm export)")
        problem = export_problem(path)
        if problem:
            raise CheckpointError(f"{path}: {problem}")
        meta = read_json(cfg_file)
        if not isinstance(meta, dict):
            raise CheckpointError(f"{cfg_file}: not a model config (a JSON object was expected)")
        if meta.get("model_type") == "beit":
            src = hf_config_to_model_config(meta)
            sd = hf_to_ours(_hf_weights(path), src)
            overrides, sd, strict = without_head(src, sd, overrides)
            cfg = hf_config_to_model_config(meta, **overrides)
            return "hf", build_and_load(cfg, sd, strict)
        if "model_args" in meta or str(meta.get("architecture", "")).startswith("beit"):
            sd = timm_to_ours(_hf_weights(path))
            args = _timm_overrides(meta.get("model_args", {}))
            overrides, sd, strict = without_head(infer_config(sd, **args), sd, overrides)
            cfg = infer_config(sd, **{**args, **overrides})
            return "timm", build_and_load(cfg, sd, strict)
        raise CheckpointError(f"{path}/config.json is neither an HF Beit nor a timm config")
    if path.suffix == ".safetensors":
        sd, meta = load_weights(path)
        sd = timm_to_ours(sd)
        if isinstance(meta.get("model_config"), dict):
            saved = from_dict(ModelConfig, meta["model_config"], prefix="model.")
            overrides, sd, strict = without_head(saved, sd, overrides)
            cfg = from_dict(ModelConfig, {**meta["model_config"], **overrides}, prefix="model.")
            return "beit", build_and_load(cfg, sd, strict, saved.grid_size)
        extra = _timm_overrides(meta["timm_model_args"]) if isinstance(meta.get("timm_model_args"), dict) else {}
        return "timm", build_and_load(infer_config(sd, **{**extra, **overrides}), sd, strict)
    obj = read_torch_file(path)
    sd, wrapped = _unwrap(obj)
    if any(k.startswith(("beit.", "encoder.layer.", "embeddings.")) for k in sd):
        raise CheckpointError(f"{path}: HF transformers weights; pass the folder with its config.json")
    sd = timm_to_ours(sd)
    return ("official" if wrapped else "timm"), build_and_load(infer_config(sd, **overrides), sd, strict)


def _timm_overrides(args: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields that a timm ``model_args`` dict pins down beyond the weights' shapes."""
    out: dict[str, Any] = {}
    if "num_heads" in args:
        out["num_heads"] = int(args["num_heads"])
    if "img_size" in args:
        out["img_size"] = args["img_size"]
    if args.get("global_pool") == "token":
        out["use_mean_pooling"] = False
    if "init_values" in args:
        out["layer_scale_init"] = float(args["init_values"] or 0.0)
    return out


# --------------------------------------------------------------------------------------------- exporting


def _state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


def export_hf(model: VisionTransformer, out_dir: str | Path, arch: str | None = None,
              labels: list[str] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers.<arch>.from_pretrained(out_dir)``
    loads; ``arch`` defaults to BeitForImageClassification / BeitForMaskedImageModeling / BeitModel by the
    model's heads; ``labels``: the class names (``id2label``/``label2id``; ``LABEL_i`` without them)."""
    cfg = model.cfg
    arch = arch or hf_arch_for(cfg)
    hf_cfg = model_config_to_hf_config(cfg, arch)
    if labels and cfg.num_classes and len(labels) == cfg.num_classes:
        hf_cfg["id2label"] = {str(i): name for i, name in enumerate(labels)}
        hf_cfg["label2id"] = {name: i for i, name in enumerate(labels)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_plain(ours_to_hf(_state_dict(model), cfg, arch), out / "model.safetensors")
    write_text(out / "config.json", json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    _write_export_manifest(out, ("config.json", "model.safetensors"))
    return out


EXPORT_MANIFEST = "manifest.json"  # next to an export: size + SHA-256 of its files (transformers, timm ignore it)
EXPORT_FORMAT = "beit-export/1"


def _write_export_manifest(out: Path, names: tuple[str, ...]) -> None:
    files = {n: {"size": (out / n).stat().st_size, "sha256": file_digest(out / n)} for n in names}
    write_text(out / EXPORT_MANIFEST, json.dumps({"format": EXPORT_FORMAT, "files": files}, indent=1) + "\n")


def export_problem(folder: Path) -> str | None:
    """Why an export folder written here does not hold what was written (a file differs from the SHA-256 in
    its manifest), or None; folders of other tools (no manifest of ours) are not checked."""
    manifest = folder / EXPORT_MANIFEST
    if not manifest.is_file():
        return None
    data = read_json(manifest)
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        return None
    for name, want in (data.get("files") or {}).items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing (listed in {EXPORT_MANIFEST})"
        if file_digest(f) != (want or {}).get("sha256"):
            return f"{name} does not match the SHA-256 in {EXPORT_MANIFEST} (damaged or edited since the export)"
    return None


def write_text(path: Path, text: str) -> None:
    """Atomic text write (the exports' JSON, manifest and model card)."""
    from .checkpoint import write_text_atomically

    write_text_atomically(path, text)


def _save_plain(sd: dict[str, torch.Tensor], path: Path) -> None:
    """Atomic safetensors write with the plain ``format: pt`` metadata transformers looks for (and the file's
    own SHA-256, which transformers ignores); non-finite weights are refused."""
    tmp = path.with_name(f".{path.name}.tmp")
    with removed_on_failure(path, tmp):
        write_safetensors({k: v.contiguous() for k, v in sd.items()}, tmp, {"format": "pt"})
        tmp.replace(path)


def export_timm(model: VisionTransformer, out_dir: str | Path, pretrained_cfg: dict[str, Any] | None = None) -> Path:
    """Write timm's local-folder layout: ``model.safetensors`` (timm ``Beit`` names) + ``config.json``
    (``architecture``, ``num_classes``, ``label_names``, ``model_args``, ``pretrained_cfg``).

    ``pretrained_cfg``: the input description (``mean``, ``std``, ``crop_pct``, ``interpolation``,
    ``label_names``: ``model.pretrained_cfg`` of :func:`beit.load`); ImageNet statistics and crop 1.0 without it.
    Load it with ``timm.create_model(f"local-dir:{out_dir}", pretrained=True)`` (timm's local-folder
    convention; without ``pretrained=True`` timm builds random weights, as for any model name), or by hand::

        cfg = json.load(open(out_dir / "config.json"))
        m = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"])
        m.load_state_dict(safetensors.torch.load_file(out_dir / "model.safetensors"))
    """
    cfg = model.cfg
    args = timm_model_args(cfg)
    pc = dict(pretrained_cfg or {})
    labels = pc.get("label_names") if cfg.num_classes and len(pc.get("label_names") or []) == cfg.num_classes else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = ours_to_timm(_state_dict(model))
    if cfg.use_sincos_pos_emb:
        sd["pos_embed"] = model.pos_embed.detach().float().cpu()
    save_weights(sd, out / "model.safetensors", {"timm_model_args": args})
    meta = dict(
        architecture=_timm_arch(cfg),
        num_classes=cfg.num_classes,
        num_features=cfg.embed_dim,
        global_pool=args["global_pool"],
        model_args=args,
        pretrained_cfg=dict(
            input_size=[cfg.in_chans, *cfg.img_hw],
            fixed_input_size=True,
            num_classes=cfg.num_classes,
            mean=list(pc.get("mean", (0.485, 0.456, 0.406))),
            std=list(pc.get("std", (0.229, 0.224, 0.225))),
            interpolation=pc.get("interpolation", "bicubic"),
            crop_pct=float(pc.get("crop_pct", 1.0)),
            crop_mode="center",
            first_conv="patch_embed.proj",  # what timm adapts for in_chans, drops for num_classes changes
            classifier="head",
        ),
    )
    if labels:
        meta["label_names"] = list(labels)
    write_text(out / "config.json", json.dumps(meta, indent=2) + "\n")
    _write_export_manifest(out, ("config.json", "model.safetensors"))
    return out


def check_export_target(out_dir: str | Path, overwrite: bool = False) -> Path:
    """``out_dir`` if an export may write there: a new or empty folder, or any folder with ``overwrite``
    (then only the exported files are replaced). A file, or a non-empty folder without ``overwrite``, is
    refused with a one-line :class:`FileExistsError`: nothing of the user's is replaced silently."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"export target {out} is a file, not a folder")
    if out.is_dir() and not overwrite:
        held = sorted(p.name for p in out.iterdir())
        if held:
            raise FileExistsError(f"export target {out} is not empty (holds {', '.join(held[:3])}"
                                  f"{', ...' if len(held) > 3 else ''}): choose a new folder or pass --overwrite")
    return out


def export(model: VisionTransformer, out_dir: str | Path, fmt: str, overwrite: bool = False) -> Path:
    """Export for another library: ``fmt`` is ``hf`` (transformers) or ``timm``. ``out_dir`` must be new or
    empty unless ``overwrite`` (see :func:`check_export_target`)."""
    check_export_target(out_dir, overwrite)
    if fmt == "hf":
        return export_hf(model, out_dir)
    if fmt == "timm":
        return export_timm(model, out_dir)
    raise ConfigError(f"unknown export format {fmt!r}; expected 'hf' or 'timm'")


def model_metadata(model: VisionTransformer) -> dict[str, Any]:
    """Safetensors metadata that makes a weights file self-describing for :func:`load_any` (kind ``beit``)."""
    return {"model_config": to_dict(model.cfg)}


__all__ = [
    "adapt_state_dict",
    "build_and_load",
    "check_export_target",
    "export",
    "export_hf",
    "export_problem",
    "export_timm",
    "hf_config_to_model_config",
    "hf_to_ours",
    "infer_config",
    "load_any",
    "model_config_to_hf_config",
    "model_metadata",
    "ours_to_hf",
    "ours_to_timm",
    "resize_pos_and_rel_tables",
    "timm_model_args",
    "timm_to_ours",
    "without_head",
    "write_text",
]
