"""Method registry: ``--method NAME`` -> builder, config section and presets.

A method joins by calling :func:`register` in its own module (``methods/beit.py``, ``methods/mae.py``,
...): every module of this package is imported by :func:`methods`, and a module elsewhere (a plugin, a
test) joins by being imported before the registry is read. Everything that lists methods is derived from
here: :class:`beit.tasks.pretrain.PretrainConfig` (one section per method), the pretraining presets, the
CLI's ``--method`` choices and each method's default preset.

A builder takes the whole ``PretrainConfig`` and returns ``(method, per-sample transform, config)``, the
config being the one it actually used (e.g. with ``model.vocab_size`` set from the tokenizer), so the saved
config rebuilds the same model. A method that reads a tokenizer (BEiT's ``--tokenizer``) registers with
``loads_tokenizer=True`` and is handed the loader (:func:`beit.loading.load_tokenizer`, by the pretraining
task): methods sit below the loading layer and never open weight files themselves.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError

__all__ = ["MethodSpec", "build_method", "get", "methods", "presets", "register", "unregister"]

Builder = Callable[[Any], tuple[Any, Callable, Any]]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    build: Builder  # PretrainConfig -> (method module, per-sample transform, resolved PretrainConfig)
    config: type | None = None  # dataclass of the method's section ``cfg.<name>`` (None: no section)
    presets: dict[str, dict] = field(default_factory=dict)  # preset name -> config dict (method is filled in)
    default_preset: str = ""  # the CPU-sized recipe used when neither --preset nor --config is given
    loads_tokenizer: bool = False  # the builder takes ``load_tokenizer`` (path -> tokenizer) as a keyword


_METHODS: dict[str, MethodSpec] = {}
_discovered = False
_NOT_METHODS = {"base", "registry"}


def register(name: str, build: Builder, *, config: type | None = None, presets: dict[str, dict] | None = None,
             default_preset: str = "", loads_tokenizer: bool = False) -> MethodSpec:
    """Make ``--method name`` available; returns its spec. Preset names must be unique across methods."""
    presets = {k: {**v, "method": name} for k, v in (presets or {}).items()}
    taken = {p: m for m, s in _METHODS.items() if m != name for p in s.presets}
    clash = sorted(set(presets) & set(taken))
    if clash:
        raise ValueError(f"method {name!r}: preset {clash[0]!r} already belongs to method {taken[clash[0]]!r}")
    if default_preset and default_preset not in presets:
        raise ValueError(f"method {name!r}: default preset {default_preset!r} is not one of its presets")
    spec = MethodSpec(name, build, config, presets, default_preset, loads_tokenizer)
    _METHODS[name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a method again (a test that registered its own, a plugin being unloaded)."""
    _METHODS.pop(name, None)


def _discover() -> None:
    """Import every module of ``beit.methods`` once, so that each registers itself."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    from .. import methods as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name not in _NOT_METHODS:
            importlib.import_module(f"{package.__name__}.{info.name}")


def methods() -> dict[str, MethodSpec]:
    """Every registered method, by name, in name order (not import order: a module imported early, e.g. by a
    test, must not reorder ``--method`` choices or the preset list)."""
    _discover()
    return dict(sorted(_METHODS.items()))


def get(name: str) -> MethodSpec:
    specs = methods()
    if name not in specs:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(sorted(specs))}")
    return specs[name]


def presets() -> dict[str, dict]:
    """Every pretraining preset of every method (each sets ``method``)."""
    return {k: v for spec in methods().values() for k, v in spec.presets.items()}


def build_method(cfg, load_tokenizer: Callable[[str], Any] | None = None):
    """``(method, per-sample transform, resolved config)`` of ``cfg.method``; ``load_tokenizer`` (path ->
    tokenizer, :func:`beit.loading.load_tokenizer`) for a method that reads one."""
    spec = get(cfg.method)
    if not spec.loads_tokenizer:
        return spec.build(cfg)
    if load_tokenizer is None:
        raise TypeError(f"method {spec.name!r} reads a tokenizer: pass load_tokenizer (beit.loading.load_tokenizer)")
    return spec.build(cfg, load_tokenizer=load_tokenizer)
