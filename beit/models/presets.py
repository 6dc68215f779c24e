"""Registry of named architectures, ``arch_size_patchP_res`` as in timm (``beit_base_patch16_224``).

A preset fixes the architecture only; methods and tasks add ``vocab_size`` / ``num_classes`` and
regularisation through overrides. Sizes follow BEiT Table 1 / Appendix (base, large) and DeiT (tiny, small).
"""

from __future__ import annotations

import difflib
from typing import Any

from beit import recipes
from beit.config import ConfigError, ModelConfig, from_dict, to_dict
from beit.models.vit import VisionTransformer

PRESETS: dict[str, dict[str, Any]] = recipes.MODELS

def get_preset(name: str) -> ModelConfig:
    """The :class:`ModelConfig` of a named preset; an unknown name raises ConfigError listing the names."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown model preset {name!r}{hint}; known: {', '.join(PRESETS)}")
    return from_dict(ModelConfig, dict(PRESETS[name]))


def preset_dict(name: str, **changes: Any) -> dict[str, Any]:
    """The config dict of preset ``name`` with ``changes``: the ``model`` section of recipe presets."""
    return {**PRESETS[name], **changes}


def create_model(name_or_cfg: str | ModelConfig, **overrides: Any) -> VisionTransformer:
    """Build a :class:`VisionTransformer` from a preset name or a config, with validated overrides.

    >>> create_model("beit_tiny_patch4_32", vocab_size=8192, depth=4)
    """
    cfg = get_preset(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    if overrides:
        unknown = sorted(set(overrides) - set(to_dict(cfg)))
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(to_dict(cfg)), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown model option {unknown[0]!r}{hint}")
        cfg = from_dict(ModelConfig, {**to_dict(cfg), **overrides}, prefix="model.")
    return VisionTransformer(cfg)


__all__ = ["PRESETS", "create_model", "get_preset", "preset_dict"]
