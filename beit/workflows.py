"""Training from Python (a notebook, a script): ``beit.pretrain``, ``beit.finetune``, ``beit.probe``,
``beit.segment``, ``beit.train_tokenizer``, ``beit.embed``.

Each takes keyword arguments, runs the same code as the command of the same name, and returns a
:class:`RunResult` (the run folder and its metrics). Config sections are given as dicts or dataclasses,
merged over the preset: ``beit.finetune(data="cifar/", init="runs/mae", out="runs/ft", steps=500,
optim={"lr": 1e-3}, aug={"mixup": 0.0})``. ``data`` is a folder path or a ``torch.utils.data.Dataset``
(``pretrain``/``train_tokenizer``: items are images, PIL or ``(3, H, W)`` tensors in [0, 1], or tuples whose
first entry is one; ``finetune``: ``(image, label)`` items, with ``val_data`` for the validation split).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import flatten, to_dict
from .tasks import embed as embed_task
from .tasks import finetune as ft_task
from .tasks import pretrain as pre_task
from .tasks import probe as probe_task
from .tasks import segment as seg_task
from .tokenizers import train as tok_task

__all__ = ["RunResult", "embed", "finetune", "pretrain", "probe", "segment", "train_tokenizer"]


@dataclass
class RunResult:
    """What a run from Python gives back: ``run_dir`` (``beit.load(run_dir)`` reads it), the step it reached,
    ``status`` (done | interrupted | time_limit), the last training ``metrics``, and ``best``/``last_eval``
    validation metrics where the task evaluates (``best`` for probes: the best block and pooling)."""

    run_dir: Path | None
    step: int = 0
    status: str = "done"
    metrics: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # the whole result of tasks that are not trainings (probe, embed)


def _overrides(sections: dict[str, Any], **flat: Any) -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` / dataclasses -> ``{"optim.lr": 1e-3}``; ``flat`` entries that are not None."""
    out: dict[str, Any] = {}
    for name, value in sections.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = to_dict(value)
        out.update(flatten(value, f"{name}.") if isinstance(value, dict) else {name: value})
    out.update({k: v for k, v in flat.items() if v is not None})
    return out


def _length(steps: int | None, epochs: float | None) -> dict[str, Any]:
    if steps is not None:
        return {"train.steps": int(steps), "train.epochs": 0}
    if epochs is not None:
        return {"train.epochs": epochs, "train.steps": 0}
    return {}


def _result(res) -> RunResult:
    return RunResult(Path(res.run_dir), res.step, res.status, dict(res.last_metrics), dict(res.last_eval),
                     dict(res.best_eval))


def _is_path(data: Any) -> bool:
    return isinstance(data, (str, Path))


def finetune(data, *, out: str | Path, init: str | Path = "none", val_data=None, preset: str | None = None,
             config: str | Path | None = None, steps: int | None = None, epochs: float | None = None,
             resume: bool = False, max_minutes: float = 0.0, **sections: Any) -> RunResult:
    """Fine-tune a classifier (``beit finetune``). ``data``: a folder with ``train/<class>/`` and
    ``val/<class>/``, or a Dataset of ``(image, label)`` (then ``val_data`` is the validation Dataset or None);
    ``init``: anything :func:`beit.load` reads, or ``"none"`` (from scratch); ``sections``: config sections
    (``model``, ``optim``, ``train``, ``aug``, ``data``) as dicts or dataclasses."""
    ov = {**_overrides(sections), **_length(steps, epochs)}
    cfg = ft_task.build_config(preset, config, ov)
    cfg = dataclasses.replace(cfg, init=str(init))
    datasets = None
    if _is_path(data):
        cfg.data.path = str(data)
    else:
        cfg.data.path = f"(Python dataset {type(data).__name__}, {len(data)} items)"
        datasets = (data, val_data)
    return _result(ft_task.run(cfg, out, resume=resume, max_minutes=max_minutes, datasets=datasets))


def pretrain(data, *, out: str | Path, method: str = "beit", preset: str | None = None,
             config: str | Path | None = None, steps: int | None = None, epochs: float | None = None,
             tokenizer: str | Path | None = None, resume: bool = False, max_minutes: float = 0.0,
             **sections: Any) -> RunResult:
    """Self-supervised pretraining (``beit pretrain``) with ``method`` (beit | mae | ibot) on a folder of
    images or a Dataset of images; ``sections``: ``model``, ``optim``, ``train``, ``data`` and the method's
    own section (``beit``, ``mae``, ``ibot``) as dicts or dataclasses."""
    ov = {"method": method, **_overrides(sections), **_length(steps, epochs)}
    if tokenizer is not None:
        ov["tokenizer"] = str(tokenizer)
    cfg = pre_task.build_config(preset, config, ov)
    dataset = None
    if _is_path(data):
        cfg.data.path = str(data)
    else:
        cfg.data.path = f"(Python dataset {type(data).__name__}, {len(data)} items)"
        dataset = data
    return _result(pre_task.run(cfg, out, resume=resume, max_minutes=max_minutes, dataset=dataset))


def segment(data: str | Path, *, out: str | Path, init: str | Path = "none", preset: str | None = None,
            config: str | Path | None = None, steps: int | None = None, epochs: float | None = None,
            resume: bool = False, max_minutes: float = 0.0, **sections: Any) -> RunResult:
    """Semantic segmentation (``beit segment``) on a folder with ``images/{train,val}/`` and
    ``masks/{train,val}/``; ``sections``: ``model``, ``optim``, ``train``, ``data``, ``head``, ``eval``."""
    cfg = seg_task.build_config(preset, config, {**_overrides(sections), **_length(steps, epochs)})
    cfg = dataclasses.replace(cfg, init=str(init))
    cfg.data.path = str(data)
    return _result(seg_task.run(cfg, out, resume=resume, max_minutes=max_minutes))


def train_tokenizer(data, *, out: str | Path, preset: str | None = "dvae_32", config: str | Path | None = None,
                    steps: int | None = None, val_data=None, resume: bool = False, max_minutes: float = 0.0,
                    teacher: str | Path | None = None, **sections: Any) -> RunResult:
    """Train a visual tokenizer (``beit tokenizer train``) on a folder of images or a Dataset of images. The
    preset says the objective: ``dvae_32`` (gumbel), ``vq_32`` (vq; or ``model={"quantizer": "vq"}``) or
    ``vqkd_32`` / ``vqkd_224`` (VQ-KD, distilling ``teacher``: anything :func:`beit.load` reads). ``sections``:
    ``model``, ``objective`` (gumbel/vq) or ``vqkd``, ``optim``, ``train``, ``data`` as dicts or dataclasses."""
    run_dir = tok_task.train_tokenizer(data, out, preset, steps, _overrides(sections), config=config, val_dir=val_data,
                                       resume=resume, max_minutes=max_minutes, teacher=teacher)
    ev = run_dir / "eval.json"
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    last = next((r for r in reversed(rows) if "loss" in r), {})
    return RunResult(run_dir, int(last.get("step", 0)), "done", last,
                     json.loads(ev.read_text()) if ev.is_file() else {})


def probe(data: str | Path, *, init: str | Path, protocol: str = "knn", out: str | Path | None = None,
          **options: Any) -> RunResult:
    """A linear or kNN probe of a frozen backbone (``beit probe``); ``options``: the probe config's keys
    (``layers="all"``, ``pool="mean"``, ``k=20``, ``steps=500``, ...; ``data={"labels_per_class": 10}``).
    ``best`` holds the best block/pooling, ``extra`` the whole result."""
    cfg = probe_task.build_config(None, {"protocol": protocol, **_overrides(options)})
    cfg = dataclasses.replace(cfg, init=str(init))
    cfg.data.path = str(data)
    res = probe_task.run(cfg, out)
    return RunResult(None, best=dict(res.get("best") or {}), extra=res)


def embed(init: str | Path, data: str | Path, out: str | Path | None = None, *, progress: bool = False,
          overwrite: bool = False, **options: Any):
    """Pooled features of every image in the folder ``data`` (``beit embed``): a :class:`beit.tasks.embed.Embeddings`
    (``features`` ``(N, D)`` numpy, ``paths``, ``labels``, ``classes``), also written to ``out`` (``.npy`` +
    ``.csv``) if given. ``options``: ``layer=-1``, ``pool="mean"``, ``batch_size``, ``device``, ..."""
    cfg = dataclasses.replace(embed_task.build_config(None, _overrides(options)), init=str(init), data=str(data))
    emb = embed_task.embed(cfg, progress)
    if out is not None:
        embed_task.save(emb, out, overwrite)
    return emb
