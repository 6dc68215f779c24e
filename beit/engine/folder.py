"""The run folder as the engine uses it: claimed once (lock, kind, leftovers; every rank waits for rank 0),
the checkpoint a run resumes from, the resume checked against the saved config."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
import yaml

from .. import checkpoint as ckpt
from ..runs import RunDir, run_kind
from .distributed import DistEnv
from .state import TrainingError


def claim_run(env: DistEnv, run_dir: str | Path, kind: str | None, resume: bool) -> None:
    """Rank 0 claims the run folder (:meth:`beit.runs.RunDir.claim`: lock, kind, leftovers); the other
    ranks wait until it has, so none of them writes into a folder that is not yet (or never) the run's."""
    if env.is_main:
        RunDir(run_dir).claim(kind, resume)
    if env.enabled:
        dist.barrier()


def kind_of(config_yaml: str | None) -> str | None:
    """The run kind a config says (:func:`beit.runs.run_kind`: ``pretrain-mae``, ``finetune``...), None if
    it says none."""
    kind = run_kind(yaml.safe_load(config_yaml) or {}) if config_yaml else "unknown"
    return None if kind == "unknown" else kind


def prepare_run(run_dir: Path, resume: bool, env: DistEnv, config_yaml: str | None,
                inputs: dict[str, str] | None, anyway: bool, claimed: bool = False) -> Path | None:
    """Claim the run folder (unless ``claimed``: :func:`beit.engine.run` did), find the checkpoint to resume
    from (rank 0 first: it drops damaged ones, then every rank agrees), check the resume against the saved
    config."""
    if not claimed:
        claim_run(env, run_dir, kind_of(config_yaml), resume)
    existing = existing_checkpoint(run_dir, resume, env.is_main) if env.is_main else None
    if env.is_main:
        RunDir(run_dir).check_resume(existing, config_yaml, inputs, anyway)
        RunDir(run_dir).record_session()  # command line, versions, git commit, machine (run.json)
    if env.enabled:
        dist.barrier()
    return existing if env.is_main else existing_checkpoint(run_dir, resume, False)


def existing_checkpoint(run_dir: Path, resume: bool, is_main: bool) -> Path | None:
    """The intact checkpoint to resume from (None: start fresh); leftovers of interrupted writes removed.
    A fresh start refuses a folder with checkpoints; a resume refuses one whose checkpoints are all damaged."""
    if is_main:
        ckpt.remove_stale(run_dir)
    good, damaged = ckpt.find_checkpoints(run_dir)
    if not resume:
        if good is not None or damaged:
            raise TrainingError(
                f"{run_dir} already holds checkpoints (latest: {(good or damaged[0][0]).name}); "
                "pass --resume to continue it or choose another --out")
        return None
    if good is None:
        if damaged:
            ckpt.require_checkpoint(run_dir)  # raises: none is intact
        return None
    good = ckpt.latest_checkpoint(run_dir)  # warns about the damaged ones it skips
    if damaged and is_main:
        ckpt.discard_after(run_dir, int(good.name.split("_")[-1]))
    return good
