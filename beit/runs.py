"""Run directories: what a training command writes, and how it is claimed, checked and read back.

A *run directory* is what a training command writes into ``--out``::

    RUN/config.yaml            the resolved config (rebuilds the model exactly)
    RUN/metrics.jsonl          one JSON line per logged step and evaluation
    RUN/checkpoints/step_N/    model.safetensors, state.json (step, state_prefix, ...), config.yaml, ...
    RUN/checkpoints/latest     the name of the newest complete checkpoint
    RUN/checkpoints/best/      tasks with a ``best_metric``: the best weights on the validation set

A checkpoint directory (``RUN/checkpoints/step_N``, ``.../best``) is read the same way: its own
``config.yaml`` and weights. :class:`RunDir` answers "is this a run?", "where is its config, its latest
checkpoint, its metrics?"; the weights in it are read by :mod:`beit.loading` (the one way in for weights),
:func:`beit.load` reads) for a downstream model.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from . import machine
from .checkpoint import (
    CKPT_DIR,
    TMP_PREFIX,
    CheckpointError,
    latest_checkpoint,
    remove_stale,
    require_checkpoint,
    verify_checkpoint,
    write_text_atomically,
)
from .checkpoint_io import file_digest, read_json
from .config import ModelConfig, flatten, from_dict
from .data.views import IMAGENET_MEAN, IMAGENET_STD
from .models.tokenizer import tokenizer_file
from .version import __version__

log = logging.getLogger("beit")

__all__ = [
    "RunDir",
    "git_commit",
    "session_record",
    "RunError",
    "abandon_failed_starts",
    "config_differences",
    "describe_kind",
    "forget_starts",
    "input_digest",
    "is_run",
    "read_config",
    "release_in_child",
    "run_kind",
]


class RunDir:
    """A run directory (or one of its checkpoint directories) of this project."""

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def holds_run(cls, path: str | Path) -> bool:
        """True if ``path`` is a folder written by a training command (or one of its checkpoints)."""
        p = Path(path)
        return p.is_dir() and ((p / CKPT_DIR).is_dir() or (p / cls.CONFIG).is_file())

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def checkpoints_path(self) -> Path:
        return self.path / CKPT_DIR

    # ----------------------------------------------------------------------------------------- writing a run

    def claim(self, kind: str | None, resume: bool) -> RunDir:
        """Make this folder the run of this process: take its lock (held until the process ends; a second
        writer gets a one-line :class:`RunError` naming the holder), check that it is new, empty or a run
        of the same ``kind`` (a folder of the user's is never written into), record ``run.json`` and remove
        what interrupted writers left. Idempotent within one process. What this start adds to the folder is
        remembered, for :func:`abandon_failed_starts`."""
        existed = self.path.is_dir()
        self._create()
        before = frozenset(p.name for p in self.path.iterdir()) if existed else frozenset()
        _STARTED.setdefault(str(self.path.resolve()), (self.path, not existed, before))
        self._check_kind(kind)  # before the lock file is made: a folder of the user's stays untouched
        self.lock()
        recorded = self._check_kind(kind)  # again, now that no other writer can change it
        if recorded is None or (recorded == "unknown" and kind):
            self.write_manifest(kind=kind or "unknown", created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), host=socket.gethostname())
        remove_stale(self.path, keep_live=False)
        return self

    def _check_kind(self, kind: str | None) -> str | None:
        recorded = self.manifest().get("kind")
        if recorded is None:
            self._check_adoptable(kind)
        elif kind and recorded not in (kind, "unknown"):
            raise RunError(f"--out {self.path} is {describe_kind(recorded)}; this command writes "
                           f"{describe_kind(kind)}: choose another --out")
        return recorded

    def check_resume(self, ckpt: Path | None, config_yaml: str | None, inputs: dict[str, str] | None = None,
                     anyway: bool = False) -> None:
        """Before training into this run: record the content hashes of ``inputs`` (config key -> file, e.g.
        the tokenizer) on a fresh start; on a resume from ``ckpt``, refuse (unless ``anyway``) every change
        that alters what is trained, as one line listing them: the saved config against ``config_yaml``
        (:data:`RESUME_FREE` keys excepted; ``train.steps`` may grow) and the inputs by content."""
        hashes = {name: input_digest(path) for name, path in (inputs or {}).items() if path}
        recorded = self.manifest().get("inputs") or {}
        diffs = [f"{name}: a file with other content (sha256 {recorded[name][:12]} -> {h[:12]})"
                 for name, h in hashes.items() if ckpt is not None and recorded.get(name, h) != h]
        if ckpt is not None and config_yaml and (ckpt / self.CONFIG).is_file():
            same_content = {name for name in hashes if name in recorded}
            diffs += config_differences(read_config(ckpt / self.CONFIG), yaml.safe_load(config_yaml) or {},
                                        ignore=same_content)
        if diffs and not anyway:
            shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
            raise RunError(f"--resume {self.path} with changes to what is trained: {shown}. Resume with the "
                           "saved config, choose another --out, or pass --resume-anyway")
        if diffs:
            log.warning("resuming anyway with changes: %s", "; ".join(diffs))
        if hashes and (ckpt is None or diffs or any(n not in recorded for n in hashes)):
            self.write_manifest(inputs={**recorded, **hashes})

    def _create(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"--out {self.path} is a file, not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create --out {self.path}: {e.strerror or e}") from None

    def _check_adoptable(self, kind: str | None) -> None:
        """A folder without ``run.json`` is written into only when it is empty (but for our own leftovers)
        or a run of the same kind made before run manifests existed."""
        held = sorted(p.name for p in self.path.iterdir() if p.name != LOCK and not p.name.startswith(TMP_PREFIX))
        if not held:
            return
        legacy = None
        if self.config_path.is_file() and (self.checkpoints_path.is_dir() or self.metrics_path.is_file()):
            try:
                legacy = run_kind(read_config(self.config_path))
            except CheckpointError:
                legacy = None
        if legacy is None or legacy == "unknown":
            shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            raise RunError(f"--out {self.path} is not empty and is not a beit run (holds {shown}): nothing of "
                           "yours is replaced; choose a new or empty folder")
        if kind and legacy != kind:
            raise RunError(f"--out {self.path} is {describe_kind(legacy)}; this command writes "
                           f"{describe_kind(kind)}: choose another --out")

    def lock(self) -> None:
        """Take the run's exclusive OS lock (``fcntl.flock`` on ``RUN/.lock``) for the rest of this process's
        life; the OS releases it when the process ends, however it ends. Re-entrant within the process."""
        key = str(self.path.resolve())
        if key in _HELD:
            return
        # O_CLOEXEC: a program this process starts does not inherit the lock; forked DataLoader workers do
        # inherit the descriptor (fork copies it), and flock() is held while any copy is open, so the engine's
        # worker_init_fn closes theirs (release_in_child): the lock ends with the main process, even by kill -9
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunError(f"--out {self.path} is in use by {holder}: one process writes a run at a time "
                           "(wait for it to end, or choose another --out)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        _HELD[key] = fd

    def release(self) -> None:
        """Give the lock back before the process ends (tests; long-lived processes that write many runs)."""
        fd = _HELD.pop(str(self.path.resolve()), None)
        if fd is not None:
            os.close(fd)

    def manifest(self) -> dict:
        """``run.json`` (kind, creation, content hashes of inputs), or {} for a folder without one."""
        path = self.path / MANIFEST
        if not path.is_file():
            return {}
        data = read_json(path)
        return data if isinstance(data, dict) else {}

    def record_session(self) -> None:
        """Add this training session (:func:`session_record`) to ``run.json``: a resume adds one more."""
        self.write_manifest(sessions=[*self.manifest().get("sessions", []), session_record()])

    def write_manifest(self, **changes) -> None:
        write_text_atomically(self.path / MANIFEST, json.dumps({**self.manifest(), **changes}, indent=1) + "\n")

    def record_files(self, *names: str) -> None:
        """Record in ``run.json`` the SHA-256 of files the run wrote at its top (``config.yaml``,
        ``classes.txt``): what is read back later is checked against it (:meth:`checked`)."""
        files = dict(self.manifest().get("files") or {})
        files.update({name: file_digest(self.path / name) for name in names})
        self.write_manifest(files=files)

    def checked(self, name: str) -> Path:
        """``RUN/name``, after checking it against the SHA-256 ``run.json`` recorded for it (files of runs
        made before hashes were recorded pass): a one-line :class:`CheckpointError` when it differs."""
        path = self.path / name
        want = (self.manifest().get("files") or {}).get(name) if (self.path / MANIFEST).is_file() else None
        if want and path.is_file() and file_digest(path) != want:
            raise CheckpointError(f"{path} does not match the SHA-256 recorded in {self.path / MANIFEST} when the "
                                  "run wrote it (damaged or edited since)")
        return path

    # ----------------------------------------------------------------------------------------- reading a run

    def latest(self) -> Path | None:
        """The newest intact checkpoint directory (damaged or incomplete newer ones skipped), or None."""
        return latest_checkpoint(self.path)

    def checkpoint(self) -> Path:
        """The checkpoint directory to read weights from: the newest intact one of a run, or this directory
        itself when it is a checkpoint (verified). A run without an intact checkpoint is an error."""
        if self.checkpoints_path.is_dir():
            return require_checkpoint(self.path)
        if (self.path / "model.safetensors").is_file():
            return verify_checkpoint(self.path)
        return self.path

    def config(self) -> dict:
        """The resolved config (a dict) saved with the checkpoint, or else with the run."""
        for cand in (self.checkpoint() / self.CONFIG, self.config_path):
            if cand.is_file():
                return read_config(self.checked(self.CONFIG) if cand == self.config_path else cand)
        raise CheckpointError(f"{self.path}: no config.yaml next to the checkpoint")

    def kind(self) -> str:
        """What the run is, from its saved config: tokenizer, pretrain-<method>, finetune, segment, unknown."""
        return run_kind(self.config())

    def resumable_model_config(self) -> ModelConfig | None:
        """The model config of a run that has a checkpoint to resume from (None otherwise)."""
        if self.latest() is None or not self.config_path.is_file():
            return None
        saved = read_config(self.checked(self.CONFIG))
        if not isinstance(saved.get("model"), dict):
            return None
        return from_dict(ModelConfig, saved["model"], prefix="model.")


def git_commit(root: Path | None = None) -> str | None:
    """The commit of the checkout beit runs from (``+dirty`` with uncommitted changes to tracked files), or None
    for an installed package (no ``.git`` next to it) or without git."""
    root = root or Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def session_record() -> dict:
    """What made this session of a run: when, the command line, beit's and torch's versions, the git commit
    (from a checkout), the machine (:func:`beit.machine.describe`)."""
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": shlex.join(sys.argv),
            "beit": __version__, "torch": torch.__version__, "git": git_commit(), "machine": machine.describe()}


MANIFEST = "run.json"  # what the run is (kind), when and where it was made, content hashes of its inputs
LOCK = ".lock"  # flock'ed by the process writing the run; holds "pid N on host H"
_HELD: dict[str, int] = {}  # run folders this process has locked -> file descriptor (kept open)
# run folders this process claimed -> (path, whether it made the folder, the names the folder held before)
_STARTED: dict[str, tuple[Path, bool, frozenset[str]]] = {}


def is_run(path: str | Path) -> bool:
    """Whether ``path`` holds a run to resume: checkpoints, a config, or a ``run.json`` (a start that was
    killed before writing anything else)."""
    p = Path(path)
    return RunDir.holds_run(p) or (p / MANIFEST).is_file()


def release_in_child() -> None:
    """In a forked child (a DataLoader worker): close the inherited descriptors of the run locks, so the lock
    is held by the main process alone and ends when it dies. Closing a copy does not unlock the parent's:
    flock() locks belong to the open file description, released when its last descriptor closes."""
    for fd in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


def forget_starts() -> None:
    """Forget the run folders claimed so far (a command ended well, or a new one begins in this process):
    :func:`abandon_failed_starts` only ever cleans up after the command that failed."""
    _STARTED.clear()


def abandon_failed_starts() -> list[Path]:
    """After a start failed (a user error before training): remove what this process added to each run folder
    it claimed (``.lock``, ``run.json``, ``decode_cache/``, ``config.yaml``...), and the folder itself if this
    process made it and it is empty now; never what was there before. A folder where training began (a
    checkpoint, or a logged step in ``metrics.jsonl``) is kept as it is: its record explains the failure.
    Returns the folders cleaned."""
    cleaned = []
    for key, (path, made, before) in list(_STARTED.items()):
        del _STARTED[key]
        metrics = path / RunDir.METRICS
        if (not path.is_dir() or any((path / CKPT_DIR).glob("step_*"))
                or (metrics.is_file() and metrics.stat().st_size > 0)):
            continue
        RunDir(path).release()
        for entry in path.iterdir():
            if entry.name not in before:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        if made and not any(path.iterdir()):
            path.rmdir()
        cleaned.append(path)
    return cleaned


class RunError(RuntimeError):
    """A run folder cannot be used as asked (in use, not a run, another kind, config changed on resume)."""


def read_config(path: Path) -> dict:
    """A saved ``config.yaml`` as a dict, or a one-line :class:`CheckpointError` naming the file."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: not readable YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a run config (a mapping was expected)")
    return data


# Keys that change how a run executes or reports, not what it trains: free to change on --resume.
RESUME_FREE = frozenset({
    "train.num_workers", "train.log_every", "train.ckpt_every", "train.eval_every", "train.device",
    "train.tensorboard", "train.log", "train.compile", "train.precision", "train.probe_every", "init", "tokenizer_preset",
    "train.nonfinite", "train.max_nonfinite_skips",
    "data.val_path", "data.val_limit"})
RESUME_FREE_SECTIONS = ("probe.", "eval.")  # online probes and evaluation settings: reports, not training
# Keys added to configs after runs were made with their default: a run saved without one used the default.
RESUME_DEFAULTED = {"data.mean": list(IMAGENET_MEAN), "data.std": list(IMAGENET_STD)}
RESUME_GROWS = frozenset({"train.steps", "train.epochs"})  # the schedule may be extended


def config_differences(saved: dict, new: dict, ignore: set[str] | frozenset = frozenset()) -> list[str]:
    """``key old -> new`` for every setting that differs between two resolved configs and changes what is
    trained (not in :data:`RESUME_FREE` or ``ignore``; a longer schedule is not a difference)."""
    a, b = flatten(saved), flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        old, cur = a.get(key, "(unset)"), b.get(key, "(unset)")
        if key in RESUME_DEFAULTED and old == "(unset)":
            old = RESUME_DEFAULTED[key]
        if old == cur or key in RESUME_FREE or key in ignore or key.startswith(RESUME_FREE_SECTIONS):
            continue
        if key in RESUME_GROWS and isinstance(old, (int, float)) and isinstance(cur, (int, float)) and cur >= old:
            continue
        out.append(f"{key} {old} -> {cur}")
    return out


def input_digest(path: str | Path) -> str:
    """SHA-256 of an input file (a tokenizer folder counts as its ``tokenizer.safetensors``)."""
    p = tokenizer_file(path)
    if not p.is_file():
        raise CheckpointError(f"{path}: no such file")
    return file_digest(p)


def run_kind(cfg: dict) -> str:
    """What a run's saved config says it is: tokenizer, pretrain-<method>, finetune, segment or unknown."""
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    if "objective" in cfg or "quantizer" in model:
        return "tokenizer"
    if "method" in cfg:
        return f"pretrain-{cfg['method']}"
    if "head" in cfg:
        return "segment"
    if "aug" in cfg:
        return "finetune"
    return "unknown"


_KIND_WORDS = {"tokenizer": "a tokenizer run", "segment": "a segmentation run", "finetune": "a fine-tuning run",
               "unknown": "a run of unknown kind"}


def describe_kind(kind: str) -> str:
    """``pretrain-mae`` -> ``a pretraining run (mae)``; the other kinds in words."""
    return f"a pretraining run ({kind.split('-', 1)[1]})" if kind.startswith("pretrain-") else _KIND_WORDS[kind]
