"""Reading weights made by other code: HF transformers folders, timm files and folders, official BEiT
checkpoints (``.pth``), and this project's self-describing ``.safetensors`` files.

The key mappings are pure functions of :mod:`beit.interop`; this module opens the files (through the
guarded readers of :mod:`beit.checkpoint_io`: nothing is unpickled beyond tensors and plain containers)
and builds the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint_io import CheckpointError, load_weights, read_json, read_torch_file
from ..config import ModelConfig, from_dict
from ..interop import (
    export_problem,
    hf_config_to_model_config,
    hf_to_ours,
    infer_config,
    timm_config_overrides,
    timm_to_ours,
)
from ..models.vit import VisionTransformer
from .weights import build_and_load, without_head

__all__ = ["hf_folder_weights", "load_any", "read_official", "unwrap_state_dict"]


def read_official(path: str | Path, allowed: list | tuple = ()) -> Any:
    """The object pickled in an official ``.pth``/``.pkl`` file, read as tensors and plain containers only
    (``allowed``: more globals the restricted unpickler may bind, e.g. inert records standing in for the
    classes of a pickled module). :class:`beit.checkpoint_io.UnpicklingRefused` for anything else."""
    return read_torch_file(path, allowed=allowed)


def unwrap_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], bool]:
    """The state dict inside a checkpoint object, and whether it came wrapped (official training files)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a state dict, got {type(obj).__name__}")
    for key in ("model", "module", "state_dict", "model_ema"):
        if key in obj and isinstance(obj[key], dict):
            inner, _ = unwrap_state_dict(obj[key])
            return inner, True
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError("no tensors found in checkpoint")
    for prefix in ("module.", "encoder.", "model."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd, False


def hf_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of an HF or timm export folder: one safetensors file, its shards, or a pickle (read as
    plain tensors)."""
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
        return unwrap_state_dict(read_torch_file(pt))[0]
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin")


def load_any(path: str | Path, **overrides: Any) -> tuple[str, VisionTransformer]:
    """Load weights in any supported layout -> ``(kind, model)``, kind in ``hf | timm | official | beit``.

    - a folder with an HF ``config.json`` (``model_type: beit``) and model.safetensors / pytorch_model.bin;
    - a folder written by :func:`beit.exporting.export_timm` (timm's ``config.json`` with ``model_args``);
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
            sd = hf_to_ours(hf_folder_weights(path), src)
            overrides, sd, strict = without_head(src, sd, overrides)
            cfg = hf_config_to_model_config(meta, **overrides)
            return "hf", build_and_load(cfg, sd, strict)
        if "model_args" in meta or str(meta.get("architecture", "")).startswith("beit"):
            sd = timm_to_ours(hf_folder_weights(path))
            args = timm_config_overrides(meta.get("model_args", {}))
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
        extra = timm_config_overrides(meta["timm_model_args"]) if isinstance(meta.get("timm_model_args"), dict) else {}
        return "timm", build_and_load(infer_config(sd, **{**extra, **overrides}), sd, strict)
    obj = read_torch_file(path)
    sd, wrapped = unwrap_state_dict(obj)
    if any(k.startswith(("beit.", "encoder.layer.", "embeddings.")) for k in sd):
        raise CheckpointError(f"{path}: HF transformers weights; pass the folder with its config.json")
    sd = timm_to_ours(sd)
    return ("official" if wrapped else "timm"), build_and_load(infer_config(sd, **overrides), sd, strict)
