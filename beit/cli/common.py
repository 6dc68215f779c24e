"""Helpers shared by every command module: training flags, overrides, result printing, user errors.

Every training command accepts ``--preset``, ``--config FILE.yaml`` and trailing ``key=value`` overrides
(``optim.lr=1e-3 model.drop_path_rate=0.2``); common flags (``--steps``, ``--batch-size``...) are
shorthands for overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from ..config import TRACKERS, ConfigError

__all__ = ["TRAIN_FLAGS", "add_train_flags", "emit", "one_line", "overrides", "print_config", "print_result",
           "run_options", "user_errors", "with_paths"]

# flag -> config key, shared by every training command
TRAIN_FLAGS = {
    "steps": "train.steps",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "accum": "train.accum_steps",
    "lr": "optim.lr",
    "precision": "train.precision",
    "workers": "train.num_workers",
    "seed": "train.seed",
    "device": "train.device",
}


def add_train_flags(p: argparse.ArgumentParser, presets: list[str] | None = None, check_choices: bool = True) -> None:
    """The flags every training command shares (preset, config, length, batch, resume, overrides...).
    ``check_choices=False``: ``presets`` are listed in the help but not enforced by the parser (pretraining: a
    plugin method brings presets of its own, checked when the config is built)."""
    g = p.add_argument_group("training (shorthands for config overrides)")
    g.add_argument("--preset", choices=presets if check_choices else None, metavar="NAME",
                   help=f"recipe preset ({', '.join(presets)})" if presets else "recipe preset")
    g.add_argument("--config", metavar="YAML", help="config file applied after the preset")
    g.add_argument("--steps", type=int, help="total optimizer steps (train.steps); replaces the preset's length")
    g.add_argument("--epochs", type=float, help="epochs (train.epochs); replaces the preset's length")
    g.add_argument("--batch-size", type=int, help="global batch per optimizer step (train.batch_size)")
    g.add_argument("--accum", type=int, help="gradient accumulation steps (train.accum_steps)")
    g.add_argument("--lr", type=float, help="peak learning rate (optim.lr)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="train.precision; auto: bf16 on CUDA (fp16 without bf16), on CPU bf16 where measured faster")
    g.add_argument("--workers", type=int, help="data loading processes (train.num_workers)")
    g.add_argument("--seed", type=int, help="train.seed")
    g.add_argument("--device", help="auto | cpu | cuda (train.device)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (an error if --out holds no run)")
    g.add_argument("--resume-or-start", action="store_true",
                   help="continue the run in --out if there is one, else start it (for scripts that rerun a command)")
    g.add_argument("--resume-anyway", action="store_true",
                   help="with --resume: accept changes to what is trained (each is logged) instead of refusing")
    g.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop (with a checkpoint) after this many minutes of training; 0 = no limit; with "
                        "train.fit_to_time=true the run is first shortened to the steps that fit, so its "
                        "schedule completes")
    g.add_argument("--log", action="append", choices=TRACKERS, metavar="TRACKER",
                   help="also log to an experiment tracker (repeatable): tensorboard (RUN/tensorboard), wandb (offline "
                        "in RUN/wandb unless WANDB_MODE is set), mlflow (file store RUN/mlruns unless "
                        "MLFLOW_TRACKING_URI is set); config, machine, metrics and pictures (train.log; needs "
                        "pip install 'beit[track]')")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved config (preset, --config, flags and overrides) as YAML and exit")
    g.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-3")


def overrides(args: argparse.Namespace, extra: dict[str, str] | None = None) -> list[str]:
    """``key=value`` overrides from the flags the user gave (``TRAIN_FLAGS`` plus ``extra``), then the
    trailing ``key=value`` arguments.

    A length flag the user typed wins over the preset's length, whichever unit the preset used:
    ``--epochs`` also clears ``train.steps`` (which would otherwise take precedence), ``--steps`` clears
    ``train.epochs``. Both at once is an error."""
    flags = {**TRAIN_FLAGS, **(extra or {})}
    out = []
    for flag, key in flags.items():
        val = getattr(args, flag, None)
        if val is not None:
            out.append(f"{key}={val}")
    length = {f: flags[f] for f in ("steps", "epochs") if getattr(args, f, None) is not None
              and flags[f] == TRAIN_FLAGS[f]}
    if len(length) == 2:
        raise ConfigError("give the length of training once: --steps N or --epochs N, not both")
    if length:
        other = "epochs" if "steps" in length else "steps"
        out.append(f"{TRAIN_FLAGS[other]}=0")
    if getattr(args, "log", None):
        out.append(f"train.log=[{','.join(dict.fromkeys(args.log))}]")
    for item in args.overrides or []:
        if "=" not in item:
            raise ConfigError(f"unexpected argument {item!r} (overrides are key=value)")
        out.append(item)
    return out


def run_options(args: argparse.Namespace) -> dict:
    """The keyword arguments every training run takes from the shared flags (resume, time limit).
    ``--resume`` on a folder that holds no run is an error (a mistyped path would start a new run and exit 0);
    ``--resume-or-start`` resumes when there is a run and starts one when there is none."""
    from ..runs import RunError, is_run  # the library only when a command runs (parsing stays torch-free)

    out = getattr(args, "out", None)
    resume = bool(args.resume)
    if resume and out is not None and not is_run(out):
        raise RunError(f"--resume {out}: no run there (no run.json, config.yaml or checkpoints/); check the path, "
                       "or pass --resume-or-start to start a new run when there is none")
    if getattr(args, "resume_or_start", False):
        resume = out is not None and is_run(out)
    return {"resume": resume, "resume_anyway": args.resume_anyway, "max_minutes": args.max_minutes}


def with_paths(cfg, init: str | None, data: str | None):
    """Paths are set as given (never YAML-parsed: a folder named ``1e3`` or ``true`` stays a string)."""
    changes = {}
    if init is not None:
        changes["init"] = init
    if data is not None:
        changes["data"] = dataclasses.replace(cfg.data, path=data)
    return dataclasses.replace(cfg, **changes)


def print_config(args: argparse.Namespace, cfg) -> bool:
    """``--print-config``: the resolved config as YAML on stdout (True: the command stops here)."""
    if not getattr(args, "print_config", False):
        return False
    from ..config import dump_yaml

    print(dump_yaml(cfg), end="")
    return True


def emit(args: argparse.Namespace, data: dict, human: str) -> None:
    """The end of every command: with ``--json`` one JSON line on stdout and nothing else (for scripts), without
    it the short human summary (a table, where the files are, the next command)."""
    print(json.dumps(data) if getattr(args, "json", False) else human)


def result_dict(res) -> dict:
    """The machine-readable summary of a training run (:class:`beit.engine.TrainResult`). The running training
    metrics are averaged over the last logging window of augmented training batches, so they are named ``train_*``
    and never sit next to the validation numbers of ``best`` and ``last_eval`` under the same name."""
    summary = {"run": str(res.run_dir), "step": res.step, "status": res.status}
    for k in ("loss", "mlm_acc", "acc"):
        if k in res.last_metrics:
            summary[f"train_{k}"] = round(res.last_metrics[k], 4)
    if res.best_eval:
        summary["best"] = res.best_eval
    if res.last_eval:
        summary["last_eval"] = res.last_eval
    return summary


def print_result(args: argparse.Namespace, res, kind: str, data_path: str | None = None) -> None:
    """A training run's end: :func:`result_dict` with ``--json``, else its human summary."""
    from .summary import training_summary

    emit(args, result_dict(res), training_summary(res, kind, data_path))


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's mistake: one line ``beit: error: ...`` and exit status 2."""
    from ..checkpoint import CheckpointError
    from ..data.folder import DataError
    from ..engine import TrainingError
    from ..runs import RunError
    from ..tokenizers.dalle import ConversionError

    return (ConfigError, DataError, TrainingError, CheckpointError, RunError, ConversionError, OSError)


def one_line(e: BaseException) -> str:
    """The message of a user error on one line: a DataLoader worker's wrapper removed, an OS error as
    ``path: reason``, line breaks joined."""
    from ..data.folder import unwrap_worker_error
    from ..loading import not_a_tokenizer
    from ..models.tokenizer import TokenizerFileError

    e = unwrap_worker_error(e)
    text = str(e)
    if isinstance(e, TokenizerFileError) and e.folder is not None:  # the model raises it plainly; words here
        text = not_a_tokenizer(e.folder)
    if isinstance(e, OSError) and e.strerror and len(e.args) > 1:  # raised by the OS, not with our message
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip()) or type(e).__name__
