"""Method registry: ``--method NAME`` -> (method module, per-sample transform, resolved config).

A builder takes the whole :class:`beit.tasks.pretrain.PretrainConfig` and returns the config it actually
used (e.g. with ``model.vocab_size`` set from the tokenizer), so the saved config rebuilds the same model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..config import ConfigError

BUILDERS: dict[str, Callable[[Any], tuple[Any, Callable, Any]]] = {}


def register(name: str):
    def deco(fn):
        BUILDERS[name] = fn
        return fn

    return deco


def build_method(cfg):
    if cfg.method not in BUILDERS:
        raise ConfigError(f"unknown method {cfg.method!r}; choose one of: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[cfg.method](cfg)


@register("beit")
def _build_beit(cfg):
    from ..models.dvae import load_tokenizer
    from .beit import BEiTMethod, build_pretrain_transform

    tok, tok_size = None, None
    if cfg.beit.target == "tokens":
        if not cfg.tokenizer:
            raise ConfigError(
                "BEiT predicts visual tokens: pass --tokenizer TOK (train one with `beit tokenizer train "
                f"--data DIR --out TOK --preset {cfg.tokenizer_preset or 'dvae_32'}`), or set beit.target=pixels"
            )
        tok = load_tokenizer(cfg.tokenizer)
        tok_size = tok.cfg.img_size
        grid = tok.cfg.grid_size if hasattr(tok.cfg, "grid_size") else None
        if grid is not None and tuple(grid if isinstance(grid, tuple) else (grid, grid)) != cfg.model.grid_size:
            raise ConfigError(
                f"the tokenizer gives a {grid} grid of ids but the model has a {cfg.model.grid_size} grid of "
                f"patches ({cfg.model.img_size}px / patch {cfg.model.patch_size}); pick matching presets"
            )
    method = BEiTMethod.build(cfg.model, tok, cfg.beit)
    cfg = dataclasses.replace(cfg, model=method.model.cfg)
    transform = build_pretrain_transform(cfg.beit, cfg.model, tok_size)
    return method, transform, cfg


from . import ibot, mae  # noqa: E402,F401  (their builders register "ibot" and "mae")
