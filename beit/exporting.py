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

import torch

from .checkpoint import write_text_atomically
from .checkpoint_io import file_digest, removed_on_failure, save_weights, write_safetensors
from .config import ConfigError, ModelConfig
from .data.folder import list_images
from .interop import (
    EXPORT_FORMAT,
    EXPORT_MANIFEST,
    hf_arch_for,
    model_config_to_hf_config,
    ours_to_hf,
    ours_to_timm,
    timm_model_args,
)
from .loading import load
from .models.vit import VisionTransformer
from .preprocess import hf_image_processor_config, run_root
from .runs import RunDir, run_kind

__all__ = ["check_export_target", "export", "export_hf", "export_model", "export_timm", "model_card", "write_text"]

WRITES = {"hf": ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"),
          "timm": ("config.json", "model.safetensors", "README.md")}


def export(source: str | Path, fmt: str, out: str | Path, *, which: str | None = None, overwrite: bool = False,
           license: str | None = None) -> Path:
    """Load ``source`` (anything :func:`beit.load` reads) and write it to the new or empty folder ``out`` in
    ``fmt`` (``hf`` or ``timm``) with its preprocessing, class names and model card. ``license``: the licence
    of the weights/data, stated in the card (``unknown`` if not given)."""
    if fmt not in WRITES:
        raise ConfigError(f"unknown export format {fmt!r}; expected 'hf' or 'timm'")
    check_export_target(out, overwrite)  # before the (slow) load
    model = load(source, which=which)
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"{source} is a tokenizer: export writes vision transformers (HF or timm Beit)")
    pcfg = model.pretrained_cfg
    out = Path(out)
    if fmt == "hf":
        export_hf(model, out, labels=pcfg.get("label_names"))
        write_text(out / "preprocessor_config.json",
                           json.dumps(hf_image_processor_config(pcfg), indent=2) + "\n")
    else:
        export_timm(model, out, pretrained_cfg=pcfg)
    write_text(out / "README.md", model_card(source, model, fmt, out, license))
    return out


# --------------------------------------------------------------------------------------------- the model files


def _timm_arch(cfg: ModelConfig) -> str:
    size = {192: "tiny", 384: "small", 768: "base", 1024: "large"}.get(cfg.embed_dim, "base")
    if size == "tiny" or size == "small":  # timm registers no tiny/small BEiT; the args define the model
        size = "base"
    res = 384 if cfg.img_size == 384 else 224
    return f"beit_{size}_patch16_{res}"


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



def _write_export_manifest(out: Path, names: tuple[str, ...]) -> None:
    files = {n: {"size": (out / n).stat().st_size, "sha256": file_digest(out / n)} for n in names}
    write_text(out / EXPORT_MANIFEST, json.dumps({"format": EXPORT_FORMAT, "files": files}, indent=1) + "\n")



def write_text(path: Path, text: str) -> None:
    """Atomic text write (the exports' JSON, manifest and model card)."""
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


def export_model(model: VisionTransformer, out_dir: str | Path, fmt: str, overwrite: bool = False) -> Path:
    """Export for another library: ``fmt`` is ``hf`` (transformers) or ``timm``. ``out_dir`` must be new or
    empty unless ``overwrite`` (see :func:`check_export_target`)."""
    check_export_target(out_dir, overwrite)
    if fmt == "hf":
        return export_hf(model, out_dir)
    if fmt == "timm":
        return export_timm(model, out_dir)
    raise ConfigError(f"unknown export format {fmt!r}; expected 'hf' or 'timm'")


# --------------------------------------------------------------------------------------------- the model card


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
    arch = hf_arch_for(cfg) if fmt == "hf" else "timm Beit"
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
