"""Convert OpenAI's DALL-E dVAE (``encoder.pkl``, ``decoder.pkl``) into a beit tokenizer, safely.

The official files are whole ``dall_e.Encoder`` / ``dall_e.Decoder`` modules pickled with ``torch.save``;
a plain ``torch.load`` would run whatever the pickle asks for. The project rule is that pickles are read
with ``weights_only=True`` or not at all, so they are read (:func:`beit.loading.read_official`) by torch's
restricted unpickler with an allow-list. The allow-listed names (``dall_e.encoder.Encoder``, ``torch.nn.modules.activation.ReLU``, ...)
are bound to :class:`_Stub`, an inert record that only stores the pickled ``__dict__``: no real module is
built, no ``__setstate__``/constructor of a third-party class runs, and the ``dall_e`` package does not
even need to be installed. Anything outside the list (``os.system``, ``builtins.eval``, other classes) is
refused by the unpickler before it is called. The parameters are then read from the records' ``_parameters``
and ``_modules`` and checked against the architecture rebuilt from the records' hyper-parameters.

Result: ``out_dir/tokenizer.safetensors`` (weights + config) and ``out_dir/config.yaml``, the
``dalle_112`` architecture (``img_size`` 112 for BEiT's 224px two-view setup; the dVAE itself is
convolutional and was trained at 256px).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint_io import CheckpointError, UnpicklingRefused
from ..config import save_yaml
from ..loading import read_official
from ..models.tokenizer import Tokenizer, TokenizerConfig, save_tokenizer


class ConversionError(ValueError):
    """The files are not DALL-E dVAE pickles we can read safely; one-line message."""


class _Stub:
    """Inert stand-in for an allow-listed class: remembers the pickled state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # a REDUCE on the class lands here: ignored
        self.__dict__["_stub_args"] = args

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_stub_state"] = state if isinstance(state, dict) else {}


def _stub_class(qualified: str) -> type:
    return type(qualified.rsplit(".", 1)[-1], (_Stub,), {"qualified_name": qualified})


_DALLE_CLASSES = [
    "dall_e.encoder.Encoder",
    "dall_e.encoder.EncoderBlock",
    "dall_e.decoder.Decoder",
    "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.upsampling.Upsample",
    "torch.nn.modules.linear.Identity",
]
_STUBS = [(_stub_class(name), name) for name in _DALLE_CLASSES]


def _safe_load_module_record(path: str | Path) -> _Stub:
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path} does not exist")
    try:
        obj = read_official(path, allowed=_STUBS)
    except UnpicklingRefused as e:
        raise ConversionError(
            f"{path}: refused to unpickle (only DALL-E dVAE modules are allowed; nothing was executed): {e.refused}"
        ) from None
    except CheckpointError as e:  # not a torch file, or malformed data
        raise ConversionError(str(e)) from None
    if not isinstance(obj, _Stub):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a pickled dall_e Encoder/Decoder")
    return obj


def _state(rec: _Stub) -> dict:
    return rec.__dict__.get("_stub_state", {})


def _flatten(rec: _Stub, prefix: str = "") -> dict[str, torch.Tensor]:
    """Walk the pickled module records like ``nn.Module.state_dict`` does (parameters, then children)."""
    st = _state(rec)
    out: dict[str, torch.Tensor] = {}
    for name, p in (st.get("_parameters") or {}).items():
        if p is not None:
            if not torch.is_tensor(p):
                raise ConversionError(f"parameter {prefix}{name} is a {type(p).__name__}, not a tensor")
            out[prefix + name] = p.detach().float()
    for name, child in (st.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, _Stub):
            raise ConversionError(f"sub-module {prefix}{name} is a {type(child).__name__}")
        out.update(_flatten(child, f"{prefix}{name}."))
    return out


def _hparam(rec: _Stub, key: str, default: int | None = None) -> int:
    v = _state(rec).get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConversionError(f"{type(rec).__name__}.{key} is {v!r}, expected an integer")
    return v


def convert_dalle(
    encoder_pkl: str | Path, decoder_pkl: str | Path, out_dir: str | Path, img_size: int = 112
) -> Path:
    """Read DALL-E's ``encoder.pkl`` and ``decoder.pkl`` safely; write ``out_dir/tokenizer.safetensors``.

    Returns the path of the written file. Raises :class:`ConversionError` (one line) for anything else.
    """
    enc, dec = _safe_load_module_record(encoder_pkl), _safe_load_module_record(decoder_pkl)
    if getattr(enc, "qualified_name", "") != "dall_e.encoder.Encoder":
        raise ConversionError(f"{encoder_pkl}: holds {getattr(enc, 'qualified_name', '?')}, not dall_e Encoder")
    if getattr(dec, "qualified_name", "") != "dall_e.decoder.Decoder":
        raise ConversionError(f"{decoder_pkl}: holds {getattr(dec, 'qualified_name', '?')}, not dall_e Decoder")
    n_groups = _hparam(enc, "group_count", 4)
    if _hparam(dec, "group_count", 4) != n_groups or n_groups != 4:
        raise ConversionError("dall_e encoder/decoder with group_count != 4 do not exist upstream")
    vocab = _hparam(enc, "vocab_size")
    if _hparam(dec, "vocab_size") != vocab or _hparam(dec, "n_blk_per_group") != _hparam(enc, "n_blk_per_group"):
        raise ConversionError("encoder and decoder do not belong together (vocab_size/n_blk_per_group differ)")
    try:
        cfg = TokenizerConfig(
            img_size=img_size,
            in_chans=_hparam(enc, "input_channels", 3),
            vocab_size=vocab,
            n_hid=_hparam(enc, "n_hid"),
            n_groups=n_groups,
            n_blk_per_group=_hparam(enc, "n_blk_per_group"),
            n_init=_hparam(dec, "n_init"),
        )
    except ValueError as e:
        raise ConversionError(f"unsupported dall_e hyper-parameters: {e}") from None
    if _hparam(dec, "n_hid") != cfg.n_hid or _hparam(dec, "output_channels", 3) != cfg.in_chans:
        raise ConversionError("encoder and decoder widths/channels differ; not a matching DALL-E pair")

    tok = Tokenizer(cfg)
    state = {f"encoder.{k}": v for k, v in _flatten(enc).items()}
    state.update({f"decoder.{k}": v for k, v in _flatten(dec).items()})
    expected = tok.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"weights do not match the DALL-E layout: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ConversionError(f"{k}: shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    tok.load_state_dict(state, strict=True)
    out_dir = Path(out_dir)
    path = save_tokenizer(tok, out_dir)
    save_yaml(cfg, out_dir / "config.yaml")
    return path


__all__ = ["ConversionError", "convert_dalle"]
