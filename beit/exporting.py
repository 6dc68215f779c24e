"""``beit export``: a model folder that HF transformers or timm load as they are, with its model card.

:func:`beit.interop.export_hf` / :func:`~beit.interop.export_timm` write the weights and the library's
config; this module adds what comes from the run the weights were trained in: class names (``id2label``,
timm ``label_names``), the input preprocessing (HF ``preprocessor_config.json``, timm ``pretrained_cfg``:
size, crop, mean/std, as :func:`beit.transform_for` applies them) and a model card ``README.md`` (what the
model is, how it was trained, on which data, its results, the command, how to load it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import api, interop
from .config import ConfigError
from .data.folder import list_images
from .models.vit import VisionTransformer
from .preprocess import hf_image_processor_config, run_root
from .runs import RunDir, run_kind

__all__ = ["export", "model_card"]

WRITES = {"hf": ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"),
          "timm": ("config.json", "model.safetensors", "README.md")}


def export(source: str | Path, fmt: str, out: str | Path, *, which: str | None = None, overwrite: bool = False,
           license: str | None = None) -> Path:
    """Load ``source`` (anything :func:`beit.load` reads) and write it to the new or empty folder ``out`` in
    ``fmt`` (``hf`` or ``timm``) with its preprocessing, class names and model card. ``license``: the licence
    of the weights/data, stated in the card (``unknown`` if not given)."""
    if fmt not in WRITES:
        raise ConfigError(f"unknown export format {fmt!r}; expected 'hf' or 'timm'")
    interop.check_export_target(out, overwrite)  # before the (slow) load
    model = api.load(source, which=which)
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"{source} is a tokenizer: export writes vision transformers (HF or timm Beit)")
    pcfg = model.pretrained_cfg
    out = Path(out)
    if fmt == "hf":
        interop.export_hf(model, out, labels=pcfg.get("label_names"))
        interop.write_text(out / "preprocessor_config.json",
                           json.dumps(hf_image_processor_config(pcfg), indent=2) + "\n")
    else:
        interop.export_timm(model, out, pretrained_cfg=pcfg)
    interop.write_text(out / "README.md", model_card(source, model, fmt, out, license))
    return out


def _count(folder: Path) -> int | None:
    try:
        return len(list_images(folder)) if folder.is_dir() else None
    except Exception:  # an unreadable folder only leaves the count out of the card
        return None


def _data_lines(conf: dict[str, Any]) -> list[str]:
    path = str((conf.get("data") or {}).get("path") or "")
    if not path:
        return ["- data: not recorded"]
    root = Path(path)
    parts = []
    for split in ("train", "val", "test"):
        n = _count(root / split)
        if n is not None:
            parts.append(f"{n:,} {split}")
    if parts:
        return [f"- data: the folder `{root.name}` ({', '.join(parts)} images)"]
    n = _count(root)
    return [f"- data: the folder `{root.name}` ("
            + (f"{n:,} images)" if n is not None else "image count unknown: not found at export time)")]


def _results(run: Path) -> list[str]:
    f = run / "metrics.jsonl"
    if not f.is_file():
        return []
    rows = []
    for line in f.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "val_top1" in row:
            rows.append(row)
    if not rows:
        return []
    best = max(rows, key=lambda r: r["val_top1"])
    return ["## Results", "",
            f"Validation top-1 (the run's `val/` folder): best {best['val_top1']:.2f}% at step {best['step']}, "
            f"last {rows[-1]['val_top1']:.2f}% at step {rows[-1]['step']}.", "",
            "Baselines: none are recorded with this run. Measure the same labels with raw pixels "
            "(`beit probe knn --init pixels`) and the same recipe from scratch (`beit finetune --init none`) "
            "before reading these numbers as a gain from pretraining.", ""]


def _training_lines(run: Path) -> list[str]:
    conf = RunDir(run).config()
    kind = run_kind(conf)
    train = conf.get("train") or {}
    lines = [f"- run kind: {kind}"]
    if conf.get("method"):
        lines.append(f"- method: {conf['method']}")
    if conf.get("init"):
        lines.append(f"- initialised from: `{conf['init']}`")
    length = [f"{train[k]} {k}" for k in ("steps", "epochs") if train.get(k)]
    lines.append(f"- length: {', '.join(length) or 'not recorded'}; batch {train.get('batch_size', '?')}; "
                 f"lr {(conf.get('optim') or {}).get('lr', '?')}")
    lines += _data_lines(conf)
    cmds = _commands(RunDir(run).manifest())
    lines += ["", "Command" + ("s (the first made the run, the others resumed it):" if len(cmds) > 1 else ":"), "",
              "```bash", *cmds, "```"] if cmds else ["- command: not recorded in the run's run.json"]
    return lines


def _commands(manifest: dict[str, Any]) -> list[str]:
    """The command lines recorded in ``run.json``: one per session (start, resumes), or a single ``command``."""
    sessions = manifest.get("sessions") if isinstance(manifest.get("sessions"), list) else []
    cmds = [s.get("command") for s in sessions if isinstance(s, dict)] or [manifest.get("command")]
    return [" ".join(map(str, c)) if isinstance(c, list) else str(c) for c in cmds if c]


_USAGE = {
    "hf": '''```python
from transformers import pipeline, AutoImageProcessor, AutoModel
{pipe}processor = AutoImageProcessor.from_pretrained("{out}", backend="pil")
model = AutoModel.from_pretrained("{out}")   # or {arch}.from_pretrained("{out}")
```

`backend="pil"` gives the pixels `beit.transform_for` gives (PIL resize); the default torchvision
backend (also the pipeline's) resizes tensors and differs by up to one intensity level per pixel.''',
    "timm": '''```python
import timm
model = timm.create_model("local-dir:{out}", pretrained=True)   # pretrained=True loads the weights
cfg = timm.data.resolve_data_config({{}}, model=model)            # size, crop_pct, mean, std of the run
transform = timm.data.create_transform(**cfg)
```

`pretrained=True` is required: without it timm builds the architecture with random weights, for a
`local-dir:` folder exactly as for any other model name (timm's convention; nothing in the folder can
change it). `num_classes=0` gives the pooled features.''',
}


def model_card(source: str | Path, model: Any, fmt: str, out: Path, license: str | None = None) -> str:
    """The export's ``README.md`` (HF model-card front matter, then plain sections)."""
    cfg, pcfg = model.cfg, model.pretrained_cfg
    labels = pcfg.get("label_names")
    src = Path(source)
    is_run = RunDir.holds_run(src)
    run = run_root(src)
    task = "image-classification" if cfg.num_classes else "image-feature-extraction"
    params = sum(p.numel() for p in model.parameters())
    arch = interop.hf_arch_for(cfg) if fmt == "hf" else "timm Beit"
    front = ["---", f"library_name: {'transformers' if fmt == 'hf' else 'timm'}", f"license: {license or 'unknown'}",
             f"pipeline_tag: {task}", "tags: [beit, vision, self-supervised]", "---", ""]
    body = [f"# {run.name if is_run else src.name}", "",
            f"A vision transformer ({arch}: width {cfg.embed_dim}, depth {cfg.depth}, {cfg.num_heads} heads, "
            f"{cfg.patch_size}px patches, {'x'.join(map(str, cfg.img_hw))} px input, {params / 1e6:.2f} M parameters) "
            f"exported by `beit export` from `{src}`.",
            "", "## What it outputs", "",
            (f"{cfg.num_classes} classes: {', '.join(labels) if labels else 'names not recorded'}." if cfg.num_classes
             else "Features (no classification head)" + (" and masked-image-modeling logits over "
                                                        f"{cfg.vocab_size} visual tokens." if cfg.vocab_size else ".")),
            "", "## Preprocessing", "",
            f"Resize the short side to {int(cfg.img_hw[0] / pcfg['crop_pct'] + 1e-6)} px ({pcfg['interpolation']}), "
            f"centre crop {'x'.join(map(str, cfg.img_hw))} (crop_pct {pcfg['crop_pct']}), scale to [0, 1], normalise "
            f"with mean {pcfg['mean']} and std {pcfg['std']} - as `beit.transform_for(beit.load(...))`"
            + (" and `AutoImageProcessor` (preprocessor_config.json)." if fmt == "hf" else " and timm's `create_transform`."),
            "", "## Training", ""]
    body += _training_lines(run) if is_run else ["Not a run of this project: no training record."]
    body += [""] + (_results(run) if is_run else [])
    pipe = (f'clf = pipeline("image-classification", model="{out}")   # clf("photo.jpg") -> labels and scores\n'
            if cfg.num_classes and fmt == "hf" else "")
    body += ["## Loading", "", _USAGE[fmt].format(out=out, arch=arch, pipe=pipe), "",
             f"With this project: `beit.load(\"{out}\")`.", "", "## Licence", "",
             license or "Unknown: the licence of the training data was not given at export (`beit export --license`).",
             ""]
    return "\n".join(front + body)
