"""``beit presets``: every named preset, by kind, with its model size, default length and batch.

Read from :mod:`beit.recipes` without importing torch; ``--time`` imports it and times a few training steps.
"""

from __future__ import annotations

import argparse
import time

from .. import recipes
from .common import emit
from .summary import table


def preset_lists() -> dict[str, list[str]]:
    """Kind -> preset names, for every command that takes ``--preset``."""
    return {"backbones": list(recipes.MODELS), "tokenizers": list(recipes.TOKENIZERS),
            "pretraining recipes": [p for m in sorted(recipes.PRETRAIN) for p in recipes.PRETRAIN[m]],
            "fine-tuning": list(recipes.FINETUNE), "segmentation": list(recipes.SEGMENT)}


def _length(train: dict) -> str:
    if train.get("steps"):
        return f"{train['steps']} steps"
    if train.get("epochs"):
        return f"{train['epochs']:g} epochs"
    return "the command's default length"


def preset_rows() -> list[dict]:
    """One row per training preset: kind, command, name, parameters, length, batch, and the model section."""
    rows = [{"kind": "backbone", "command": "", "name": n, "model": m, "train": {}} for n, m in recipes.MODELS.items()]
    rows += [{"kind": "tokenizer", "command": "tokenizer train", "name": n, "model": None, "train": r.get("train", {})}
             for n, r in recipes.TOKENIZER_RUNS.items()]
    rows += [{"kind": f"pretraining ({m})", "command": "pretrain", "name": n, "model": r["model"],
              "train": r.get("train", {})} for m in sorted(recipes.PRETRAIN) for n, r in recipes.PRETRAIN[m].items()]
    rows += [{"kind": "fine-tuning", "command": "finetune", "name": n, "model": r["model"], "train": r.get("train", {})}
             for n, r in recipes.FINETUNE.items()]
    rows += [{"kind": "segmentation", "command": "segment", "name": n, "model": r["model"], "train": r.get("train", {})}
             for n, r in recipes.SEGMENT.items()]
    for r in rows:
        r["params"] = recipes.parameter_count(r["model"]) if r["model"] is not None else None
        r["length"] = _length(r["train"]) if r["command"] else ""
        r["batch"] = r["train"].get("batch_size") if r["command"] else None
    return rows


def time_step(model_section: dict, batch: int, steps: int = 3) -> float:
    """Seconds per optimiser step of the backbone (forward, backward, AdamW) at ``batch`` images, measured at a
    micro-batch of at most 16 after one warm-up step and scaled linearly: an estimate, not a run."""
    import torch

    from ..config import ModelConfig, from_dict, image_hw
    from ..models.vit import VisionTransformer

    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, {**model_section, "drop_path_rate": 0.0})
    model = VisionTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    micro = max(1, min(batch, 16))
    x = torch.randn(micro, cfg.in_chans, *image_hw(cfg.img_size))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        out = model.forward_features(x) if hasattr(model, "forward_features") else model(x)
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * batch / micro


def cmd_presets(args: argparse.Namespace) -> int:
    rows = preset_rows()
    if args.time:
        from .. import machine

        chosen = set(args.time_presets or [])
        for r in rows:
            small = r["model"] is not None and max(recipes.image_hw_of(r["model"])) <= 64
            if r["command"] and r["model"] is not None and (r["name"] in chosen if chosen else small):
                r["seconds_per_step"] = round(time_step(r["model"], r["batch"] or 1), 4)
                if r["train"].get("steps"):
                    r["estimated_minutes"] = round(r["seconds_per_step"] * r["train"]["steps"] / 60, 1)
        machine_line = machine.describe()
    data = [{k: v for k, v in r.items() if k not in ("model", "train")} for r in rows]
    lines = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        lines.append(f"{kind}:")
        shown = []
        for r in (r for r in rows if r["kind"] == kind):
            size = f"{r['params'] / 1e6:.2f}M params" if r["params"] is not None else ""
            extra = (f", {r['length']}, " + (f"batch {r['batch']}" if r["batch"] else "the command's default batch")
                     if r["command"] else "")
            if "seconds_per_step" in r:
                extra += f", ~{r['seconds_per_step']:.3g} s/step"
                if "estimated_minutes" in r:
                    extra += f" = ~{r['estimated_minutes']:g} min here"
            shown.append((r["name"], (size + extra).lstrip(", ")))
        lines.append(table(shown))
    if args.time:
        lines.append(f"timed on {machine_line}: backbone forward+backward+AdamW at a micro-batch <= 16, scaled to "
                     "the batch (data loading, the method's heads and torch.compile not included)")
    else:
        lines.append("use one with: beit COMMAND --preset NAME (beit COMMAND --preset NAME --print-config shows it "
                     "in full); --time estimates minutes on this machine")
    emit(args, {"presets": data}, "\n".join(lines))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("presets", help="list the named presets: size, default length and batch (--time: minutes here)")
    p.add_argument("--time", action="store_true",
                   help="measure a few training steps of each CPU-sized preset (or of --time-presets) and estimate "
                        "the minutes of its default length on this machine (imports torch)")
    p.add_argument("--time-presets", nargs="+", metavar="NAME", help="with --time: time these presets instead")
    p.set_defaults(func=cmd_presets)
