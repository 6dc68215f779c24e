"""One lifecycle for everything that trains: :func:`run` = start -> build -> claim the run folder once -> train ->
save -> outputs.

A kind of training (pretraining, fine-tuning, segmentation, a tokenizer, a toy task in a test) fills in one
object, a :class:`TrainingTask`: ``build`` turns the config into what the loop trains (a :class:`Training`: the
method, its data, the config as used), and the optional hooks say what the run writes besides its checkpoints.
Everything else -- torchrun and seeds, the folder's lock and kind (every rank waits for rank 0's claim), resume
and its checks, ``config.yaml``, ``run.json``, ``metrics.jsonl``, signals, the non-finite guard, trackers --
is the engine's, the same for every task::

    env = start_run(cfg.train)                      # trackers installed?, torchrun, seeds
    training = task.build(cfg, env, out, resume)    # nothing written yet
    claim_run(env, out, kind, resume)               # once, every rank waits (kind: what the config says)
    task.claimed(training, env, out)                # files kept beside the checkpoints (decode cache, classes)
    result = train(training.method, training.dataset, ...)
    task.save(training, result)                     # rank 0: the product (a tokenizer file); errors count
    finish_run(env, task.outputs(training, result), result)   # rank 0: pictures; a failure is a warning
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from .. import tracking
from ..config import TrainConfig, dump_yaml
from .distributed import DistEnv, seed_everything, setup_distributed
from .folder import claim_run, kind_of
from .loop import train
from .state import TrainResult

log = logging.getLogger("beit")


@dataclass
class Training:
    """What a task hands the engine to train: its :class:`~beit.methods.base.Method` (or any module whose
    ``forward(batch)`` returns ``(loss, metrics)``), its data and the config as used (a dataclass with ``train``
    and ``optim`` sections, written to ``config.yaml`` and checked on resume; its sections also say the run's
    kind, :func:`beit.runs.run_kind`)."""

    method: nn.Module
    dataset: Dataset
    cfg: Any
    val_dataset: Dataset | None = None  # evaluated by ``method.evaluate`` each epoch / ``train.eval_every``
    collate_fn: Callable | None = None
    probe: Callable[..., dict] | None = None  # ``probe(method, device) -> metrics`` every ``probe.every`` steps
    inputs: dict[str, str] | None = None  # config key -> file whose content a resume checks (the tokenizer)
    desc: str = "train"  # the progress bar's label


class TrainingTask:
    """One kind of training, filled in once; :func:`run` does the rest. ``build`` is required, the hooks have
    defaults. One object per run: what ``build`` makes and the hooks need may be kept on ``self``."""

    def build(self, cfg: Any, env: DistEnv, out: Path, resume: bool) -> Training:
        """The method, its data and the config as used (e.g. the model config a resumed run saved, or the
        architecture of ``--init``). ``out`` is not claimed yet: nothing is written into it here."""
        raise NotImplementedError

    def claimed(self, training: Training, env: DistEnv, out: Path) -> None:
        """Every rank, once ``out`` is this run's folder and before training: files the run keeps beside its
        checkpoints (the decode cache, the class names). Default: none."""

    def save(self, training: Training, result: TrainResult) -> None:
        """Rank 0, after training (finished or stopped): what the run exists to produce besides its checkpoints
        (a tokenizer file); an error here is the run's error. Default: nothing."""

    def outputs(self, training: Training, result: TrainResult) -> dict[str, Callable[[], Any]]:
        """Rank 0, last: file name -> how to write it (pictures, evaluations); a failure is logged, never
        raised (:func:`finish_run`). Default: none."""
        return {}


def run(task: TrainingTask, cfg: Any, out: str | Path, *, resume: bool = False, max_minutes: float = 0.0,
        resume_anyway: bool = False) -> TrainResult:
    """Train ``task`` as ``cfg`` says into run folder ``out``: see the module docstring. ``resume``: continue
    from the newest intact checkpoint (checked against the saved config unless ``resume_anyway``);
    ``max_minutes``: stop (saving) after this long. Returns where and how the run ended."""
    out = Path(out)
    env = start_run(cfg.train)
    training = task.build(cfg, env, out, resume)
    config_yaml = dump_yaml(training.cfg)
    claim_run(env, out, kind_of(config_yaml), resume)
    task.claimed(training, env, out)
    result = train(training.method, training.dataset, train_cfg=training.cfg.train, optim_cfg=training.cfg.optim,
                   run_dir=out, config_yaml=config_yaml, resume=resume, val_dataset=training.val_dataset,
                   collate_fn=training.collate_fn, desc=training.desc, max_minutes=max_minutes, env=env,
                   probe=training.probe, resume_anyway=resume_anyway, inputs=training.inputs, claimed=True)
    if env.is_main:
        task.save(training, result)
    finish_run(env, task.outputs(training, result) if env.is_main else {}, result)
    return result


def start_run(train_cfg: TrainConfig) -> DistEnv:
    """The first step of every run: check that the asked trackers are installed (before anything is written),
    join torchrun's process group (if any), seed every RNG."""
    tracking.check_installed(tracking.wanted(train_cfg))
    env = setup_distributed(train_cfg.device)
    seed_everything(train_cfg.seed)
    return env


def finish_run(env: DistEnv, outputs: dict[str, Callable[[], Any]], result: TrainResult | None = None) -> None:
    """The last step of every run: rank 0 writes each output (name -> how to write it:
    pictures, summaries); a failure is logged, never raised, because a picture must never lose a finished run.
    With the run's ``result``, each picture (``*.png`` in the run folder) also goes to its trackers, which
    end here."""
    if not env.is_main:
        return
    for name, make in outputs.items():
        try:
            make()
        except Exception as e:  # noqa: BLE001 - see the docstring
            log.warning("could not write %s: %s", name, e)
    trackers = result.trackers if result is not None else None
    if trackers is not None:
        for name in outputs:
            if name.endswith(".png"):
                trackers.log_image(name.removesuffix(".png"), Path(result.run_dir) / name, result.step)
        trackers.close()

