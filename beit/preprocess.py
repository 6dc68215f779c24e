"""What a model expects as input, and the transform that gives it: ``pretrained_cfg`` and :func:`transform_for`.

Every model :func:`beit.load` returns (tokenizers too: ``[0, 1]`` images, mean 0, std 1) carries ``model.pretrained_cfg``, a dict with timm's key names
(``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``, ``num_classes``,
``label_names``), read from where the weights came from:

- a run of this project: ``config.yaml`` (fine-tuning: ``aug.mean``/``aug.std``/``aug.eval_crop_pct``/
  ``aug.interpolation``; pretraining and segmentation: ``data.mean``/``data.std``, crop 1.0, as ``beit probe``
  reads them) and ``classes.txt``;
- an HF export: ``preprocessor_config.json`` and ``id2label``; a timm export: its ``pretrained_cfg``;
- anything else: the ImageNet statistics every recipe of this project trains with, crop 1.0.

:func:`transform_for` turns it into the evaluation transform (timm's ``resolve_data_config`` +
``create_transform`` in one call), the same one ``beit finetune`` validates with and ``beit probe``/``beit
embed`` extract features with.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from .checkpoint_io import read_json
from .data.views import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from .runs import RunDir

__all__ = ["default_pretrained_cfg", "hf_image_processor_config", "pretrained_cfg_of", "read_labels", "run_root",
           "tokenizer_pretrained_cfg", "transform_for"]

_HF_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1, "box": 4, "hamming": 5}


def default_pretrained_cfg(model: Any) -> dict[str, Any]:
    """The input description of a model with no recorded preprocessing: its size, ImageNet statistics, crop 1.0."""
    cfg = model.cfg
    return {"input_size": [cfg.in_chans, *cfg.img_hw], "interpolation": "bicubic", "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "crop_pct": 1.0, "crop_mode": "center", "num_classes": cfg.num_classes,
            "label_names": None}


def tokenizer_pretrained_cfg(tokenizer: Any) -> dict[str, Any]:
    """A tokenizer's input: ``[0, 1]`` images at its size (``encode`` maps the pixels itself): mean 0, std 1."""
    cfg = tokenizer.cfg
    return {"input_size": [cfg.in_chans, cfg.img_size, cfg.img_size], "interpolation": "bicubic",
            "mean": [0.0] * cfg.in_chans, "std": [1.0] * cfg.in_chans, "crop_pct": 1.0, "crop_mode": "center",
            "num_classes": 0, "label_names": None}


def read_labels(path: str | Path) -> list[str] | None:
    """The class names in ``classes.txt`` (one a line), or None where there is none."""
    f = Path(path) / "classes.txt"
    if not f.is_file():
        return None
    names = [line.strip() for line in f.read_text().splitlines() if line.strip()]
    return names or None


def run_root(path: str | Path) -> Path:
    """The run folder of ``path``: ``RUN`` for ``RUN/checkpoints/NAME``, else ``path`` itself."""
    p = Path(path)
    return p.parent.parent if p.parent.name == "checkpoints" else p


def _from_run(path: Path) -> dict[str, Any]:
    conf = RunDir(path).config()
    aug, data = conf.get("aug") or {}, conf.get("data") or {}
    if "eval_crop_pct" in aug:  # fine-tuning: its validation transform
        return {"mean": list(aug.get("mean", IMAGENET_MEAN)), "std": list(aug.get("std", IMAGENET_STD)),
                "crop_pct": float(aug["eval_crop_pct"]), "interpolation": aug.get("interpolation", "bicubic")}
    # pretraining, segmentation (and runs made before they recorded it: ImageNet, which they all used)
    return {"mean": list(data.get("mean", IMAGENET_MEAN)), "std": list(data.get("std", IMAGENET_STD))}


def _from_hf(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    proc = path / "preprocessor_config.json"
    if proc.is_file():
        p = read_json(proc)
        crop = (p.get("crop_size") or {}).get("height")
        short = (p.get("size") or {}).get("shortest_edge")
        out = {"mean": list(p.get("image_mean", IMAGENET_MEAN)), "std": list(p.get("image_std", IMAGENET_STD))}
        if crop and short and p.get("do_center_crop"):
            out["crop_pct"] = crop / short  # unrounded: size / crop_pct gives shortest_edge back
        names = {v: k for k, v in _HF_RESAMPLE.items()}
        out["interpolation"] = names.get(p.get("resample"), "bicubic")
    id2label = read_json(path / "config.json").get("id2label") or {}
    labels = [id2label.get(str(i), "") for i in range(len(id2label))]
    if labels and not all(re.fullmatch(rf"LABEL_{i}", s) for i, s in enumerate(labels)):
        out["label_names"] = labels
    return out


def _from_timm(path: Path) -> dict[str, Any]:
    meta = read_json(path / "config.json")
    pc = meta.get("pretrained_cfg") or {}
    out = {k: pc[k] for k in ("mean", "std", "crop_pct", "interpolation") if k in pc}
    if meta.get("label_names") or pc.get("label_names"):
        out["label_names"] = list(meta.get("label_names") or pc["label_names"])
    return out


def pretrained_cfg_of(path: str | Path, model: Any) -> dict[str, Any]:
    """``model``'s input description (see the module doc), from ``path`` where it was loaded from."""
    p = Path(path)
    cfg = default_pretrained_cfg(model)
    if RunDir.holds_run(p):
        cfg.update(_from_run(p))
        cfg["label_names"] = read_labels(run_root(p))
    elif p.is_dir() and (p / "config.json").is_file():
        meta = read_json(p / "config.json")
        cfg.update(_from_hf(p) if meta.get("model_type") == "beit" else _from_timm(p))
    if not cfg.get("label_names") or len(cfg["label_names"]) != model.cfg.num_classes:
        cfg["label_names"] = None  # a new head (num_classes=...) or none: the run's names do not apply
    return cfg


def transform_for(model: Any = None, *, pretrained_cfg: dict[str, Any] | None = None, **changes: Any):
    """The evaluation transform for ``model`` (PIL image of any mode -> normalised ``(3, H, W)`` tensor):
    resize the short side to ``size / crop_pct``, centre crop, normalise, as ``model.pretrained_cfg`` says.

    ``pretrained_cfg`` instead of a model; ``changes`` replace its entries (e.g. ``crop_pct=0.875``)."""
    cfg = dict(pretrained_cfg if pretrained_cfg is not None else
               (getattr(model, "pretrained_cfg", None) or default_pretrained_cfg(model)))
    cfg.update(changes)
    size = tuple(cfg["input_size"][1:])
    return eval_transform(size[0] if size[0] == size[1] else size, float(cfg.get("crop_pct", 1.0)),
                          cfg["mean"], cfg["std"], cfg.get("interpolation", "bicubic"))


def hf_image_processor_config(pretrained_cfg: dict[str, Any]) -> dict[str, Any]:
    """``preprocessor_config.json`` of an HF export: BeitImageProcessor doing :func:`transform_for`'s steps
    (shortest edge to ``floor(size / crop_pct)``, bicubic, centre crop, rescale 1/255, normalise)."""
    h, w = pretrained_cfg["input_size"][1:]
    crop = float(pretrained_cfg.get("crop_pct", 1.0))
    return {
        "image_processor_type": "BeitImageProcessor",
        "do_resize": True,
        "size": ({"shortest_edge": int(math.floor(h / crop + 1e-6))} if h == w else
                 {"height": int(math.floor(h / crop + 1e-6)), "width": int(math.floor(w / crop + 1e-6))}),
        "resample": _HF_RESAMPLE[pretrained_cfg.get("interpolation", "bicubic")],
        "do_center_crop": True,
        "crop_size": {"height": h, "width": w},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pretrained_cfg["mean"]),
        "image_std": list(pretrained_cfg["std"]),
        "do_reduce_labels": False,
    }
