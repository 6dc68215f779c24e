"""Typed configs: dataclasses, strict parsing, YAML in/out, dotted overrides.

Every command builds its config once from (preset -> YAML file -> ``key=value`` overrides), validates it
here and saves the resolved result next to every checkpoint. Unknown keys and ill-typed values raise
:class:`ConfigError` naming the key, so a typo never silently falls back to a default.

Configs shared by several commands live here (model, optimiser, training loop). A method's own knobs
(masking, tokenizer objective, MAE decoder, ...) live in a dataclass next to the method and are plugged in
through the same functions.

Why one file of ~500 lines: the shared dataclasses and the one parser that checks them against YAML and
overrides are one contract (the parser walks the dataclasses' fields); every layer imports it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

# the experiment trackers ``train.log`` / ``--log`` accept (beit/tracking.py)
TRACKERS = ("tensorboard", "wandb", "mlflow")


class ConfigError(ValueError):
    """A user mistake in a config: unknown key, wrong type or invalid value. The message names the key."""


# --------------------------------------------------------------------------------------------- value checks

# rule -> (test, what the message says the value must be)
_RULES: dict[str, tuple[Any, str]] = {
    "positive": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "nonneg": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "finite": (math.isfinite, "a finite number"),
    "prob": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "rate": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "size": (lambda v: v >= 1, ">= 1"),
    "count": (lambda v: v >= 0, ">= 0"),
}


def check_fields(cfg: Any, section: str, rules: dict[str, str]) -> None:
    """Validate numeric fields where they are parsed: ``rules`` maps a field (or several, space-separated)
    to one of ``positive nonneg finite prob rate size count``; a failure is a :class:`ConfigError` naming
    ``section.field``. Tuples are checked element-wise; ``None`` (an unset optional) passes."""
    for names, rule in rules.items():
        test, what = _RULES[rule]
        for name in names.split():
            value = getattr(cfg, name)
            for v in value if isinstance(value, (tuple, list)) else (value,):
                if v is not None and not test(v):
                    raise ConfigError(f"{section}.{name} must be {what}, got {value}")


# --------------------------------------------------------------------------------------------- shared configs


def image_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` of an image size given as one side (square) or as ``(height, width)``."""
    if not isinstance(size, (list, tuple)):
        return (int(size), int(size))
    h, w = size
    return (int(h), int(w))


def normalize_img_size(size: Any, key: str = "img_size") -> int | tuple[int, int]:
    """An int for a square size (``[64, 64]`` -> 64), else ``(height, width)``; ConfigError naming ``key``."""
    if isinstance(size, str) and "x" in size.lower():  # "120x160": height x width
        size = size.lower().split("x")
    if isinstance(size, (list, tuple)):
        if len(size) != 2:
            raise ConfigError(f"{key}: expected one size or [height, width], got {list(size)}")
        h, w = (_coerce(v, int, key) for v in size)
        size = h if h == w else (h, w)
    elif not isinstance(size, int) or isinstance(size, bool):
        size = _coerce(size, int, key)
    if min(image_hw(size)) < 1:
        raise ConfigError(f"{key}: sizes must be positive, got {size}")
    return size


@dataclass
class ModelConfig:
    """One vision transformer, as in BEiT (arXiv 2106.08254, Sec. 2.2 and Appendix)."""

    img_size: int | tuple[int, int] = 224  # a square side, or (height, width): e.g. [120, 160] for 160x120 images
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True  # q and v biases; k bias is always zero (official BEiT / HF / timm)
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1  # stochastic depth at the last block, rising linearly from 0
    layer_scale_init: float = 0.1  # LayerScale gamma init; 0 disables LayerScale
    layer_norm_eps: float = 1e-6
    use_abs_pos_emb: bool = False
    use_sincos_pos_emb: bool = False  # fixed 2D sin-cos absolute embedding (MAE)
    use_shared_rel_pos_bias: bool = True  # one table for all layers (pretraining)
    use_rel_pos_bias: bool = False  # one table per layer (fine-tuning)
    use_mean_pooling: bool = True  # classification: mean of patch tokens -> LayerNorm -> Linear
    use_fc_norm: bool | None = None  # LayerNorm after pooling, none per token; None: with mean pooling + classes
    # >0: the classifier reads the patch tokens (each through fc_norm) averaged over a head_grid x head_grid grid
    # (head_grid^2 * embed_dim inputs) instead of their mean: keeps the layout (docs/notebook/2026-11-demo.md)
    head_grid: int = 0
    num_classes: int = 0  # >0 adds a classification head
    vocab_size: int = 0  # >0 adds a masked-image-modeling head (and the [MASK] embedding)
    use_mask_token: bool = False  # [MASK] embedding without an MIM head (iBOT student)
    init_std: float = 0.02
    head_init_scale: float = 0.001  # classification head weights scaled at init (BEiT fine-tuning)

    def __post_init__(self) -> None:
        self.img_size = normalize_img_size(self.img_size, "model.img_size")
        check_fields(self, "model", {"img_size patch_size in_chans embed_dim depth num_heads": "size",
                                     "num_classes vocab_size head_grid": "count", "mlp_ratio layer_norm_eps": "positive",
                                     "drop_rate attn_drop_rate drop_path_rate": "rate",
                                     "layer_scale_init init_std head_init_scale": "nonneg"})
        if any(s % self.patch_size for s in image_hw(self.img_size)):
            raise ConfigError(
                f"model.img_size={self.img_size} is not a multiple of model.patch_size={self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"model.embed_dim={self.embed_dim} is not divisible by model.num_heads={self.num_heads}"
            )

    @property
    def img_hw(self) -> tuple[int, int]:
        """``(height, width)`` of the input images."""
        return image_hw(self.img_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """``(rows, columns)`` of the patch grid."""
        h, w = self.img_hw
        return (h // self.patch_size, w // self.patch_size)

    @property
    def num_patches(self) -> int:
        h, w = self.grid_size
        return h * w


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine (BEiT Appendix B/C) or polynomial decay, per step."""

    lr: float = 1.5e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = -1  # -1: derive from warmup_fraction
    warmup_fraction: float = 0.0125  # 10 of 800 epochs
    clip_grad: float = 3.0  # 0 disables clipping
    layer_decay: float = 1.0  # layer-wise lr decay (fine-tuning: 0.65 base, 0.75 large); 1 = off
    schedule: str = "cosine"  # after warmup: cosine | poly (polynomial decay, the official segmentation recipe)
    power: float = 1.0  # poly: exponent of (1 - step / steps)

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "poly"):
            raise ConfigError(f"optim.schedule must be cosine or poly, got {self.schedule!r}")
        check_fields(self, "optim", {"lr eps power": "positive", "min_lr weight_decay clip_grad": "nonneg",
                                     "betas": "rate", "warmup_fraction": "prob"})
        if self.warmup_steps < -1:
            raise ConfigError(f"optim.warmup_steps must be >= 0 (or -1: from warmup_fraction), got {self.warmup_steps}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")


@dataclass
class TrainConfig:
    """The one training loop: length, batch, precision, checkpoints, logging."""

    steps: int = 0  # total optimizer steps; 0: derive from epochs
    epochs: float = 0.0
    batch_size: int = 64  # global batch per optimizer step (split over processes and accumulation)
    accum_steps: int = 1
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (fp16: CUDA only); auto: see beit/precision.py
    seed: int = 0
    num_workers: int = 2
    log_every: int = 10
    ckpt_every: int = 200  # steps; the last step always saves
    eval_every: int = 0  # steps; 0: once per epoch for tasks that evaluate
    probe_every: int = 500  # steps between online kNN probes (pretraining with --probe-data)
    # torch.compile: true | false | auto (compile when the rest of the run wins the compile time back,
    # decided after the first steps: beit/compiling.py); a failing compile falls back to eager
    compile: bool | str = "auto"
    # with --max-minutes: after the first steady steps, shorten the run to the steps that fit its minutes, so
    # that warmup and decay complete instead of being cut by the clock (beit/engine/timefit.py)
    fit_to_time: bool = False
    # experiment trackers that also get the run (beit/tracking.py): any of TRACKERS; metrics.jsonl is always written
    log: list[str] = field(default_factory=list)
    tensorboard: bool = False  # the former switch: the same as "tensorboard" in ``log``
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # a step whose loss or gradient norm is NaN/inf (docs/runs.md): stop (nothing saved; the last checkpoint,
    # always finite, is kept) | skip (no update; more than max_nonfinite_skips in a row stops). With fp16 a
    # gradient overflow is the loss scaler's signal and is always skipped (the scale is lowered), bounded alike.
    nonfinite: str = "stop"
    max_nonfinite_skips: int = 10

    def __post_init__(self) -> None:
        if self.nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train.nonfinite must be stop or skip, got {self.nonfinite!r}")
        if not isinstance(self.compile, bool) and self.compile != "auto":
            raise ConfigError(f"train.compile must be true, false or auto, got {self.compile!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        unknown = [t for t in self.log if t not in TRACKERS]
        if unknown:
            raise ConfigError(f"train.log: unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)}")
        check_fields(self, "train", {"batch_size accum_steps log_every ckpt_every probe_every": "size",
                                     "steps num_workers eval_every max_nonfinite_skips": "count", "epochs": "nonneg"})


# --------------------------------------------------------------------------------------------- machinery


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise ConfigError naming ``key``."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {getattr(tp, '__name__', tp)})")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # e.g. int | tuple[int, int]: the first that fits
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in typing.get_args(tp))}, got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.strip("()[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, key) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        return f"a list of {len(typing.get_args(tp))} values" if origin is tuple else "a list"
    return getattr(tp, "__name__", str(tp))


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types are errors naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {data!r}")
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}" + _suggest(unknown[0], names)
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - dataclass signature problems are programming errors
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def _suggest(name: str, names: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(names))})"


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-Python (YAML/JSON-safe) form of a dataclass config; tuples become lists."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(cfg)


class _Loader(yaml.SafeLoader):
    """YAML with the booleans of YAML 1.2: only ``true``/``false``. PyYAML's 1.1 rules also read ``on``,
    ``off``, ``yes``, ``no``, ``y``, ``n`` as booleans, so the README's ``data.decode_cache=off`` reached a
    string field as ``False`` (issue 26). Boolean fields still take those words (:func:`_coerce`)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 booleans (:class:`_Loader`): how configs and overrides are read."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _parse_scalar(text: str) -> Any:
    """Parse the value side of ``key=value`` with YAML rules (numbers, true/false, lists, null)."""
    try:
        return load_yaml_text(text)
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: T, overrides: list[str] | dict[str, Any]) -> T:
    """Return a copy of ``cfg`` with dotted ``key=value`` overrides applied and re-validated.

    >>> apply_overrides(cfg, ["optim.lr=1e-3", "model.drop_path_rate=0.2"])
    """
    data = to_dict(cfg)
    items = overrides.items() if isinstance(overrides, dict) else (_split(o) for o in overrides)
    for key, value in items:
        node = data
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node, dict) or p not in node or not isinstance(node[p], dict):
                raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])}" + (
                    _suggest(p, set(node)) if isinstance(node, dict) else ""))
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key {key}" + _suggest(parts[-1], set(node)))
        node[parts[-1]] = _parse_scalar(value) if isinstance(value, str) else value
    return from_dict(type(cfg), data)


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    return key.strip(), value


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(cls: type[T], path: str | Path) -> T:
    try:
        data = load_yaml_text(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return from_dict(cls, data)


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` that re-runs validation."""
    return from_dict(type(cfg), {**to_dict(cfg), **changes})


__all__ = [
    "ConfigError",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "check_fields",
    "dump_yaml",
    "field",
    "flatten",
    "from_dict",
    "load_yaml",
    "load_yaml_text",
    "replace",
    "resolve",
    "save_yaml",
    "to_dict",
    "TokenGrid",
]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (used to apply a nested preset as overrides)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resolve(
    cls: type[T],
    presets: dict[str, dict[str, Any]] | None = None,
    preset: str | None = None,
    yaml_path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> T:
    """The one way a command builds its config: defaults <- preset <- YAML file <- overrides."""
    cfg = cls()
    if preset:
        if not presets or preset not in presets:
            known = sorted(presets or {})
            raise ConfigError(f"unknown preset {preset!r}" + _suggest(preset, set(known)))
        cfg = apply_overrides(cfg, flatten(presets[preset]))
    if yaml_path:
        try:
            data = load_yaml_text(Path(yaml_path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {yaml_path}: {e}") from None
        cfg = apply_overrides(cfg, flatten(data))
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


class TokenGrid:
    """The token grid of a tokenizer config: its ``img_size`` (square) over its ``downsample`` (pixels per token
    side), both given by the config that mixes this in."""

    @property
    def grid_size(self) -> tuple[int, int]:
        s = self.img_size // self.downsample
        return (s, s)

    @property
    def num_tokens(self) -> int:
        h, w = self.grid_size
        return h * w
