"""Weights to and from HF transformers, timm and the official BEiT code (microsoft/unilm).

Our parameter names are the official/timm ones, so official and timm state dicts need only their
buffers dropped; HF transformers names are mapped here, both its on-disk layout (``beit.encoder.layer.{i}
.attention.attention.query``, what ``save_pretrained`` writes and the Hub holds) and its v5 in-memory layout
(``beit.layers.{i}.attention.q_proj``). Nothing here imports ``transformers`` or ``timm``.

Pure functions of state dicts and configs: no file is opened here. Reading their files is
:mod:`beit.loading` (:func:`beit.loading.load_any`), writing them :mod:`beit.exporting`; the position
tables at another resolution are :mod:`beit.models.positions`.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import torch

from beit.checkpoint_io import (
    CheckpointError,
    file_digest,
    read_json,
)
from beit.config import ConfigError, ModelConfig, from_dict, to_dict
from beit.models.positions import REL_TABLE, grid_of_rel_table
from beit.models.vit import VisionTransformer, uses_fc_norm

log = logging.getLogger(__name__)

_SKIP = re.compile(r"(relative_position_index|k_bias|num_batches_tracked)$")

# --------------------------------------------------------------------------------------------- timm / official


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
    tables = [v for k, v in sd.items() if k.endswith(REL_TABLE)]
    heads = tables[0].shape[1] if tables else max(1, D // 64)
    if "img_size" in overrides:  # given (timm model_args, a non-square size): the tables need not be square
        grid = 0
    elif "pos_embed" in sd:
        grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    elif tables:
        grid = grid_of_rel_table(tables[0].shape[0])
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
        use_shared_rel_pos_bias=f"rel_pos_bias.{REL_TABLE}" in sd,
        use_rel_pos_bias=f"blocks.0.attn.{REL_TABLE}" in sd,
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


def timm_config_overrides(args: dict[str, Any]) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------- export folders


EXPORT_MANIFEST = "manifest.json"  # next to an export: size + SHA-256 of its files (transformers, timm ignore it)
EXPORT_FORMAT = "beit-export/1"


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


def model_metadata(model: VisionTransformer) -> dict[str, Any]:
    """Safetensors metadata that makes a weights file self-describing for :func:`load_any` (kind ``beit``)."""
    return {"model_config": to_dict(model.cfg)}


__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_MANIFEST",
    "export_problem",
    "hf_arch_for",
    "hf_config_to_model_config",
    "hf_to_ours",
    "infer_config",
    "model_config_to_hf_config",
    "model_metadata",
    "ours_to_hf",
    "ours_to_timm",
    "timm_config_overrides",
    "timm_model_args",
    "timm_to_ours",
]
