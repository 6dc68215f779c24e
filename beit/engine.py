"""THE training loop, for every method and task.

A *method* is an ``nn.Module`` whose ``forward(batch)`` returns ``(loss, metrics)``. The loop here owns
everything else: seeded data order and augmentation (so a resumed run replays exactly the batches it would
have seen), optimiser steps with warmup-cosine lr and layer-wise scales, gradient accumulation and
clipping, bf16/fp16 autocast, checkpoints (atomic, safetensors), exact resume, SIGTERM/Ctrl-C, a NaN guard,
DDP under ``torchrun``, a progress bar and ``metrics.jsonl``. It never knows which method it trains.

The hooks it calls on the method, with their defaults, are the contract :class:`beit.methods.base.Method`.

:func:`train` reads as the algorithm; each named step is a method of :class:`Trainer`, around a
:class:`RunState` (step, best value, status, last metrics)::

    restore (checkpoint, optimiser, RNG) -> wrap (DDP, compile) -> batches (seeded order)
    while not finished: set lr -> optimizer_step -> log -> [evaluate] -> [probe] -> [save] -> [stop]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import compiling, tracking
from . import machine as machine_info
from .checkpoint_io import holding_nonfinite, nonfinite_tensors
from .compiling import AUTO_EAGER_STEPS, decide
from .config import OptimConfig, TrainConfig
from .data.folder import SKIP_LIST, DropUnreadable, write_skip_list
from .loading import read_checkpoint
from .methods.base import hooks as method_hooks
from .nonfinite import NonFiniteGuard, NonFiniteStepError, Seen, clip_grads, grad_norm
from .optim import build_optimizer, lr_at, set_lr
from .precision import for_run as precision_for_run
from .precision import rank0_value
from .runs import RunDir, release_in_child, run_kind

log = logging.getLogger("beit")


class TrainingError(RuntimeError):
    """The run cannot go on (loss NaN/inf, inconsistent resume, bad batch size); the message says why."""


# --------------------------------------------------------------------------------------------- distributed


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """DDP: several processes, or one launched by torchrun (so one process already exercises nccl/gloo)."""
        return self.world_size > 1 or (dist.is_available() and dist.is_initialized())


def setup_distributed(device: str = "auto") -> DistEnv:
    """Detect torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) and join the process group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local}"  # an explicit index: torch.cuda.set_device refuses a bare "cuda"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    launched = world > 1 or "TORCHELASTIC_RUN_ID" in os.environ  # torchrun, even with one process
    if launched and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        if rank == 0:
            log.info("torchrun: %d process(es), backend %s", world, dist.get_backend())
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_run(train_cfg: TrainConfig) -> DistEnv:
    """The first step of every command that trains: check that the asked trackers are installed (before anything
    is written), join torchrun's process group (if any), seed every RNG."""
    tracking.check_installed(tracking.wanted(train_cfg))
    env = setup_distributed(train_cfg.device)
    seed_everything(train_cfg.seed)
    return env


def finish_run(env: DistEnv, outputs: dict[str, Callable[[], Any]], result: TrainResult | None = None) -> None:
    """The last step of every command that trains: rank 0 writes each output (name -> how to write it:
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


# --------------------------------------------------------------------------------------------- data order


def sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class SeededDataset(Dataset):
    """Indexes ``(epoch, i)``: sample ``i`` is transformed under RNG seeded by (seed, epoch, i).

    Augmentations and masks then depend only on *which* sample is drawn, never on the worker or on how
    many samples came before, which is what makes resume exact and DDP equal to one process.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also seeds every accelerator backend, and while CUDA is
            # not initialised each of those calls records a Python stack trace (~0.3 ms per sample, a third of
            # a tiny preset's step); the transforms draw from the CPU generator alone
            torch.default_generator.manual_seed(s)
            random.seed(s)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)


class StepBatchSampler:
    """Yields the micro-batches of this rank from optimiser step ``start`` up to ``total``.

    Epoch ``e`` is a permutation seeded by (seed, e); optimiser step ``s`` of an epoch takes the global
    batch ``perm[s*B:(s+1)*B]``; rank ``r`` takes its contiguous share, split into ``accum`` micro-batches.
    """

    def __init__(self, n: int, global_batch: int, seed: int, start: int, total: int, rank: int, world: int,
                 accum: int, shuffle: bool = True):
        self.n, self.B, self.seed = n, global_batch, seed
        self.start, self.total, self.rank, self.world, self.accum = start, total, rank, world, accum
        self.shuffle = shuffle
        self.steps_per_epoch = n // global_batch
        self.per_rank = global_batch // world
        self.micro = self.per_rank // accum

    def __len__(self) -> int:
        return (self.total - self.start) * self.accum

    def _perm(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cached: tuple[int, torch.Tensor] | None = None
        for step in range(self.start, self.total):
            epoch, s = divmod(step, self.steps_per_epoch)
            if cached is None or cached[0] != epoch:
                cached = (epoch, self._perm(epoch))
            glob = cached[1][s * self.B:(s + 1) * self.B]
            mine = glob[self.rank * self.per_rank:(self.rank + 1) * self.per_rank].tolist()
            for a in range(self.accum):
                yield [(epoch, i) for i in mine[a * self.micro:(a + 1) * self.micro]]


def to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    if torch.is_tensor(batch):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch_size_of(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return batch_size_of(batch[0])
    return 1


# --------------------------------------------------------------------------------------------- helpers


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def unwrap(module: nn.Module) -> nn.Module:
    module = getattr(module, "_orig_mod", module)  # torch.compile
    return getattr(module, "module", module) if isinstance(module, nn.parallel.DistributedDataParallel) else module


def method_state(method: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in unwrap(method).state_dict().items()}


def shutdown_loader(batches: Any) -> None:
    """Stop a DataLoader iterator's worker processes now (no-op for anything else, or workers already gone).
    :func:`train` calls it when a run ends instead of trusting garbage collection: the workers ignore SIGTERM
    (:func:`_ignore_stop_signals`), and multiprocessing's exit handler stops leftover workers with SIGTERM and
    then waits for them, so an iterator still alive at exit hung the process (two CamVid runs, 2026-11-27)."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()


def _ignore_stop_signals(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """Loader workers leave SIGTERM / Ctrl-C to the main process, which saves and then shuts them down: a
    signal sent to the whole process group (Ctrl-C in a terminal, ``timeout``, a batch scheduler) must not kill
    a worker first and turn a clean stop into a "worker exited unexpectedly" error. The worker also closes its
    copy of the run lock's descriptor, so the lock dies with the main process (a kill -9 leaves workers
    running for a few seconds, and ``--resume`` right after was refused while they held it)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    release_in_child()


_received: list[int] = []  # the stop signals train() received in this process (the CLI's exit status)


def take_stop_signal() -> int | None:
    """The signal that stopped the last interrupted :func:`train` of this process (SIGINT, SIGTERM), or None;
    forgotten once read. The CLI exits with 128 + it after the run saved (130 for Ctrl-C, 143 for SIGTERM)."""
    sig = _received[-1] if _received else None
    _received.clear()
    return sig


class _StopFlag:
    """SIGTERM / Ctrl-C ask the loop to save and stop after the current step; a second Ctrl-C stops at once
    (KeyboardInterrupt, which the CLI turns into one line and exit status 130)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signal = signum
        _received.append(signum)
        log.warning("received %s: saving a checkpoint after this step, then stopping",
                    signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class MetricsWriter:
    """``metrics.jsonl`` (rank 0), each row also handed to the run's experiment trackers (:mod:`beit.tracking`)."""

    def __init__(self, run_dir: Path, enabled: bool, trackers: tracking.Trackers | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.trackers = trackers

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (and a line cut short by a kill) so the file
        reads as one uninterrupted run. Replaced atomically: a kill meanwhile leaves the old file."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = []
        for ln in self.path.read_text().splitlines():
            try:
                row = json.loads(ln)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                keep.append(ln)
        ckpt.write_text_atomically(self.path, "".join(ln + "\n" for ln in keep))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.trackers is not None:
            self.trackers.log_metrics(row)


def _progress(total: int, initial: int, enabled: bool, desc: str):
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True,
                mininterval=1.0, leave=True)


def next_batch(batches: Iterator) -> Any:
    """``next(batches)``; an error raised in a DataLoader worker comes back as the worker's own one-line
    error (PyTorch wraps it in a message holding the worker's whole traceback)."""
    from .data.folder import unwrap_worker_error

    try:
        return next(batches)
    except StopIteration:
        raise
    except Exception as e:
        raise unwrap_worker_error(e) from None


def claim_run(env: DistEnv, run_dir: str | Path, kind: str | None, resume: bool) -> None:
    """Rank 0 claims the run folder (:meth:`beit.runs.RunDir.claim`: lock, kind, leftovers); the other
    ranks wait until it has, so none of them writes into a folder that is not yet (or never) the run's."""
    if env.is_main:
        RunDir(run_dir).claim(kind, resume)
    if env.enabled:
        dist.barrier()


def _prepare_run(run_dir: Path, resume: bool, env: DistEnv, config_yaml: str | None,
                 inputs: dict[str, str] | None, anyway: bool) -> Path | None:
    """Claim the run folder, find the checkpoint to resume from (rank 0 first: it drops damaged ones, then
    every rank agrees), check the resume against the saved config."""

    kind = run_kind(yaml.safe_load(config_yaml) or {}) if config_yaml else "unknown"
    claim_run(env, run_dir, None if kind == "unknown" else kind, resume)
    existing = _existing_checkpoint(run_dir, resume, env.is_main) if env.is_main else None
    if env.is_main:
        RunDir(run_dir).check_resume(existing, config_yaml, inputs, anyway)
        RunDir(run_dir).record_session()  # command line, versions, git commit, machine (run.json)
    if env.enabled:
        dist.barrier()
    return existing if env.is_main else _existing_checkpoint(run_dir, resume, False)


def _existing_checkpoint(run_dir: Path, resume: bool, is_main: bool) -> Path | None:
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


def _load_resumed_weights(method: nn.Module, model_state: dict[str, torch.Tensor], existing: Path) -> None:
    try:
        missing, unexpected = unwrap(method).load_state_dict(model_state, strict=False)
    except RuntimeError as e:  # shape mismatch: the run was made with another architecture
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise TrainingError(f"checkpoint {existing} was trained with another architecture "
                            f"({lines[0] if lines else str(e).splitlines()[0]})") from None
    if unexpected or missing:
        raise TrainingError(f"checkpoint {existing} does not fit this method: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")


# --------------------------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    status: str  # "done" | "interrupted" | "time_limit"
    last_metrics: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    best_eval: dict = field(default_factory=dict)
    # the run's open experiment trackers: :func:`finish_run` sends them the pictures, then ends them
    trackers: tracking.Trackers | None = field(default=None, repr=False, compare=False)


def resolve_steps(train: TrainConfig, n_samples: int) -> tuple[int, int]:
    """(total optimiser steps, steps per epoch) from ``train.steps`` or ``train.epochs``."""
    steps_per_epoch = n_samples // train.batch_size
    if steps_per_epoch == 0:
        raise TrainingError(
            f"the dataset has {n_samples} samples, fewer than one batch of {train.batch_size}: "
            "lower train.batch_size (--batch-size) or add data"
        )
    if train.steps > 0:
        return train.steps, steps_per_epoch
    if train.epochs > 0:
        return max(1, math.ceil(train.epochs * steps_per_epoch)), steps_per_epoch
    raise TrainingError("set the length of training: --steps N or --epochs N")


@dataclass
class RunState:
    """Where a run stands: what the loop advances each step, and the ``state.json`` part of a checkpoint."""

    total_steps: int
    steps_per_epoch: int
    step: int = 0
    start_step: int = 0  # the step this process started (or resumed) at
    best_value: float | None = None  # best ``best_metric`` so far (kept across resumes)
    status: str = "done"  # "done" | "interrupted" | "time_limit"
    last_metrics: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    best_eval: dict = field(default_factory=dict)
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    @property
    def end_of_epoch(self) -> bool:
        return self.step % self.steps_per_epoch == 0

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps


class _Window:
    """Running means of the step metrics between two log lines, and the images seen meanwhile."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}  # per metric: a skipped step (train.nonfinite=skip) adds none
        self.count = 0
        self.images = 0
        self.data_wait = 0.0  # seconds this process waited for batches
        self.t0 = time.perf_counter()

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.count += 1

    def means(self) -> dict[str, float]:
        """Mean of each metric over the steps that reported it; ``nonfinite_skipped``: skipped steps, counted."""
        return {k: v if k == "nonfinite_skipped" else v / self.counts[k] for k, v in self.sums.items()}


class Trainer:
    """One run of :func:`train`: the method, its optimiser, data and outputs, and the named steps of the loop
    (:meth:`restore`, :meth:`batches`, :meth:`optimizer_step`, :meth:`log`, :meth:`evaluate`, :meth:`save`)."""

    def __init__(self, method: nn.Module, dataset: Dataset, *, train_cfg: TrainConfig, optim_cfg: OptimConfig,
                 run_dir: str | Path, config_yaml: str | None = None, val_dataset: Dataset | None = None,
                 collate_fn: Callable | None = None, desc: str = "train", max_minutes: float = 0.0,
                 env: DistEnv | None = None, probe: Callable[..., dict] | None = None, resume: bool = False,
                 resume_anyway: bool = False, inputs: dict[str, str] | None = None) -> None:
        self.env = env or setup_distributed(train_cfg.device)
        self.dataset, self.val_dataset, self.collate_fn = dataset, val_dataset, collate_fn
        # a collate function may leave the batch's last step to the device (uint8 transfer, data.views)
        self.on_device: Callable | None = getattr(collate_fn, "on_device", None)
        self.probe, self.last_probe = probe, {}
        self.run_dir, self.desc, self.resume = Path(run_dir), desc, resume
        self.resume_anyway, self.inputs = resume_anyway, inputs
        train_cfg, self.config_yaml, choice = precision_for_run(train_cfg, self.env.device, self.run_dir, resume,
                                                                config_yaml)
        if self.env.is_main:
            log.info("precision: %s (%s)", choice.precision, choice.reason)
        self.cfg, self.optim_cfg, self.max_minutes = train_cfg, optim_cfg, max_minutes
        self.state = RunState(*resolve_steps(train_cfg, len(dataset)))  # type: ignore[arg-type]
        self._check_batch()
        self.tracker_names = tracking.wanted(train_cfg)
        tracking.check_installed(self.tracker_names)  # before the run folder is claimed
        self.trackers: tracking.Trackers | None = None
        self.method = method
        self.hooks = method_hooks(method)
        self.model: nn.Module = method  # what runs forward: DDP- and compile-wrapped by :meth:`wrap`
        self.eager: nn.Module = method  # the same without torch.compile (fallback)
        self.compiled_at = 0  # the step at which torch.compile was swapped in (its first step may fall back)
        self.compile_decided = False  # train.compile=auto: decided after the first timed eager steps
        self.step_times: list[float] = []
        self.compile_key: str | None = None  # set while the first compiled step's time is still to be recorded
        self.eager_step_s = 0.0  # median eager step (train.compile=auto), subtracted from that first step
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler = torch.amp.GradScaler("cuda", enabled=train_cfg.precision == "fp16")
        self.metrics: MetricsWriter | None = None
        self.window = _Window()
        self.bar = None
        self.guard = NonFiniteGuard(unwrap(method), train_cfg.nonfinite, train_cfg.max_nonfinite_skips,
                                    loss_scaling=self.scaler.is_enabled())

    def _check_batch(self) -> None:
        cfg, env = self.cfg, self.env
        if cfg.batch_size % (env.world_size * cfg.accum_steps):
            raise TrainingError(
                f"train.batch_size={cfg.batch_size} must be divisible by processes x accum_steps "
                f"= {env.world_size} x {cfg.accum_steps}"
            )
        if cfg.precision == "fp16" and env.device.type != "cuda":
            raise TrainingError("train.precision=fp16 needs CUDA; use auto, bf16 or fp32 on CPU")

    # ------------------------------------------------------------------------------------------ set-up

    def restore(self) -> None:
        """Claim the run folder (:meth:`beit.runs.RunDir.claim`: lock, kind, leftovers); optimiser, then the
        newest intact checkpoint when resuming (weights, optimiser, RNG, step), after checking the resume
        against the saved config and the content of ``inputs`` (unless ``resume_anyway``); a run folder that
        holds checkpoints is never overwritten without ``resume``. Starts ``metrics.jsonl``."""
        resume = self.resume
        existing = _prepare_run(self.run_dir, resume, self.env, self.config_yaml, self.inputs,
                                self.resume_anyway)
        if self.env.is_main:  # the files the datasets left out, listed in the run (a Subset: its dataset's)
            write_skip_list(self.run_dir / SKIP_LIST, *(getattr(d, "dataset", d) for d in
                                                        (self.dataset, self.val_dataset) if d is not None))
        self.method.to(self.env.device)
        self.optimizer = build_optimizer(self.hooks.param_groups(self.optim_cfg), self.optim_cfg)
        if resume and existing is not None:
            self._load(existing)
        elif resume and self.env.is_main:
            log.info("no checkpoint in %s: starting from scratch", self.run_dir)
        if self.env.is_main and self.tracker_names:
            self.trackers = tracking.Trackers(
                self.run_dir, self.tracker_names, config=yaml.safe_load(self.config_yaml or "{}") or {},
                machine={**machine_info.info(self.env.device), "description": machine_info.describe(self.env.device)})
        self.metrics = MetricsWriter(self.run_dir, self.env.is_main, self.trackers)
        if self.state.step:
            self.metrics.truncate_after(self.state.step)
        elif self.env.is_main and self.metrics.path.exists():
            self.metrics.path.unlink()
        if self.env.is_main and self.config_yaml is not None:
            ckpt.write_text_atomically(self.run_dir / "config.yaml", self.config_yaml)
            RunDir(self.run_dir).record_files("config.yaml")

    def _load(self, existing: Path) -> None:
        model_state, state, tensors = read_checkpoint(existing)
        _load_resumed_weights(self.method, model_state, existing)
        ckpt.restore_training_state(state, tensors, self.optimizer, self.scaler)
        self.state.step = self.state.start_step = int(state["step"])
        self.state.best_value = state.get("best_value")
        self.state.best_eval = state.get("best_eval") or {}  # the summary of a resumed run still names its best
        if self.env.is_main:
            log.info("resumed from %s at step %d", existing, self.state.step)
        if self.state.finished:
            log.info("run already reached step %d >= %d: nothing to train (raise --steps to continue)",
                     self.state.step, self.state.total_steps)

    def wrap(self) -> None:
        """DDP under torchrun; ``torch.compile`` if asked (the eager module stays as a fallback)."""
        env = self.env
        if env.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                self.method, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                find_unused_parameters=self.hooks.find_unused_parameters)
        self.eager = self.model
        if self.cfg.compile is True:
            self.compile_now("train.compile=true")

    def compile_now(self, reason: str) -> None:
        """Swap in ``torch.compile`` of the eager module (the eager one stays as the fallback)."""
        if self.env.is_main:
            log.info("torch.compile: %s", reason)
        try:
            compiling.use_persistent_cache()  # artefacts kept for the next run of this model (beit/compiling.py)
            self.model = torch.compile(self.eager)
            self.compiled_at = self.state.step
            self.compile_key = compiling.compile_key(self.eager, self.cfg.precision, self._micro_batch())
        except Exception as e:  # noqa: BLE001 - compile is an optional speed-up
            log.warning("torch.compile unavailable (%s): running eager", e)

    def auto_compile(self, step_seconds: float) -> None:
        """``train.compile=auto``: time the first eager steps, then compile if the rest of the run wins the
        compile time back (:mod:`beit.compiling`); every process takes rank 0's decision."""
        self._record_compile_time(step_seconds)
        if self.cfg.compile != "auto" or self.compile_decided:
            return
        self.step_times.append(step_seconds)
        if len(self.step_times) < AUTO_EAGER_STEPS and not self.state.finished:
            return
        self.compile_decided = True
        later = sorted(self.step_times[1:]) or self.step_times
        step_s = rank0_value(later[len(later) // 2], self.env.device)
        self.eager_step_s = step_s
        cached = compiling.cached_compile_seconds(compiling.compile_key(self.eager, self.cfg.precision, self._micro_batch()))
        choice = decide(self.env.device.type, step_s, self.state.total_steps - self.state.step,
                        **({} if cached is None else {"compile_seconds": cached}))
        if choice.compile and not self.state.finished:
            self.compile_now(choice.reason)
        elif self.env.is_main:
            log.info("torch.compile: %s", choice.reason)

    def _micro_batch(self) -> int:
        return self.cfg.batch_size // self.env.world_size // self.cfg.accum_steps

    def _record_compile_time(self, step_seconds: float) -> None:
        """After the first compiled step: what compiling cost (that step less an eager one), for the next run's
        ``auto`` (:func:`beit.compiling.record_compile_seconds`); not when the compile fell back to eager."""
        if self.compile_key is None or self.state.step != self.compiled_at + 1:
            return
        if self.env.is_main and hasattr(self.model, "_orig_mod"):  # really torch.compile's module
            compiling.record_compile_seconds(self.compile_key, step_seconds - self.eager_step_s)
        self.compile_key = None

    def batches(self) -> Iterator:
        """This rank's micro-batches from the current step to the end, in the seeded order (exact resume)."""
        cfg, env = self.cfg, self.env
        sampler = StepBatchSampler(len(self.dataset), cfg.batch_size, cfg.seed, self.state.step,  # type: ignore[arg-type]
                                   self.state.total_steps, env.rank, env.world_size, cfg.accum_steps)
        loader = DataLoader(SeededDataset(self.dataset, cfg.seed), batch_sampler=sampler,
                            num_workers=cfg.num_workers, collate_fn=DropUnreadable(self.collate_fn),
                            pin_memory=env.device.type == "cuda", persistent_workers=False,
                            # its own generator: creating the iterator must not draw from the global RNG,
                            # whose state is part of the checkpoint (exact resume)
                            generator=torch.Generator().manual_seed(cfg.seed),
                            worker_init_fn=_ignore_stop_signals,
                            multiprocessing_context="fork" if cfg.num_workers > 0 and os.name == "posix" else None)
        return iter(loader)

    # ------------------------------------------------------------------------------------------ one step

    def _forward(self, batch: Any) -> tuple[torch.Tensor, dict]:
        with autocast_context(self.env.device, self.cfg.precision):
            try:
                return self.model(batch)
            except Exception:
                if self.model is self.eager or self.state.step > self.compiled_at:
                    raise
                log.warning("torch.compile failed on the first step: running eager")
                self.model = self.eager
                return self.model(batch)

    def optimizer_step(self, batches: Iterator) -> dict[str, float]:
        """One optimiser step over ``accum_steps`` micro-batches: forward, backward (gradients synchronised on
        the last micro-batch only), NaN guard, clipping, update, the method's ``after_step``."""
        env, accum = self.env, self.cfg.accum_steps
        metrics: dict[str, float] = {}
        loss_val = 0.0
        for micro in range(accum):
            t_wait = time.perf_counter()
            batch = to_device(next_batch(batches), env.device)
            if self.on_device is not None:
                batch = self.on_device(batch)
            self.window.data_wait += time.perf_counter() - t_wait
            last_micro = micro == accum - 1
            with contextlib.nullcontext() if (last_micro or not env.enabled) else self.model.no_sync():
                loss, step_metrics = self._forward(batch)
                self.scaler.scale(loss / accum).backward()
            loss_val += float(loss.detach()) / accum
            for k, v in step_metrics.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / accum
            self.window.images += batch_size_of(batch) * env.world_size
        update = self._judge_step(loss_val, metrics)
        if update:
            self.scaler.step(self.optimizer)
        self.scaler.update()  # no-op without fp16; with it, lowers the scale after an overflow
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.hooks.after_step(self.state.step, self.state.total_steps)
        if update:
            metrics["loss"] = loss_val
        return metrics

    def _judge_step(self, loss_val: float, metrics: dict[str, float]) -> bool:
        """The non-finite guard (:mod:`beit.nonfinite`): the global gradient norm (unscaled, computed whether
        or not it clips) is read with the loss, then the step is updated (clipped), skipped or stopped."""
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = grad_norm(params)
        norm_val = float(norm)  # the host already waited for this step's loss: no extra stall
        if self.optim_cfg.clip_grad > 0:
            metrics["grad_norm"] = norm_val
        seen = Seen(self.state.step + 1, loss_val, norm_val, self.optimizer.param_groups[0]["lr"])
        try:
            update = self.guard.judge(seen, lambda: str(ckpt.latest_checkpoint(self.run_dir) or "none yet"))
        except NonFiniteStepError as e:
            raise TrainingError(str(e)) from None
        if update and self.optim_cfg.clip_grad > 0:
            clip_grads(params, self.optim_cfg.clip_grad, norm)
        if not update:
            for k in list(metrics):  # a skipped step's metrics are not averaged into the log
                metrics.pop(k)
            metrics["nonfinite_skipped"] = 1.0
            if self.env.is_main:
                log.warning("step %d: loss %s, gradient norm %s: update skipped (%d in a row, at most %d: "
                            "train.max_nonfinite_skips)", seen.step, loss_val, norm_val, self.guard.in_a_row,
                            self.guard.max_skips)
        return update

    # ------------------------------------------------------------------------------------------ outputs

    def log(self, metrics: dict[str, float], lr: float) -> None:
        """Adds the step's metrics to the window; every ``log_every`` steps (and at the end) writes their
        means (averaged over processes) to ``metrics.jsonl`` and the progress bar."""
        st, env, w = self.state, self.env, self.window
        w.add(metrics)
        if st.step % self.cfg.log_every == 0 or st.finished:
            avg = w.means()
            if env.enabled:
                keys = sorted(avg)
                t = torch.tensor([avg[k] for k in keys], dtype=torch.float64, device=env.device)
                dist.all_reduce(t)
                avg = dict(zip(keys, (t / env.world_size).tolist()))
            dt = time.perf_counter() - w.t0
            row = {"step": st.step, "epoch": round(st.epoch, 4), "lr": lr, **avg, "precision": self.cfg.precision,
                   "images_per_s": w.images / max(dt, 1e-9), "elapsed_s": time.perf_counter() - st.t_start,
                   # per optimiser step: waiting for data vs everything else (which one limits the run)
                   "data_time": w.data_wait / w.count, "step_time": (dt - w.data_wait) / w.count}
            self.metrics.write(row)
            st.last_metrics = row
            shown = {**row, **self.last_probe}
            self.bar.set_postfix({k: f"{shown[k]:.4g}" for k in ("loss", "acc", "mlm_acc", "knn_top1", "lr",
                                                                 "images_per_s") if k in shown}, refresh=False)
            self.window = _Window()
        self.bar.update(1)

    def eval_due(self) -> bool:
        every, st = self.cfg.eval_every, self.state
        return bool(every and st.step % every == 0) or (not every and st.end_of_epoch) or st.finished

    def evaluate(self) -> None:
        """The method's ``evaluate`` on the validation set (rank 0): ``val_*`` metrics, the ``best``
        checkpoint when ``best_metric`` improved."""
        if self.val_dataset is None:
            return
        if self.env.is_main:
            micro = max(1, self.cfg.batch_size // self.env.world_size // self.cfg.accum_steps)
            vl = DataLoader(self.val_dataset, batch_size=micro * 2, shuffle=False,
                            num_workers=self.cfg.num_workers, collate_fn=DropUnreadable(self.collate_fn),
                            worker_init_fn=_ignore_stop_signals)
            self.method.eval()
            with torch.no_grad(), autocast_context(self.env.device, self.cfg.precision):
                res = self.hooks.evaluate(vl)
            self.method.train()
            if res:  # a method without validation metrics returns none
                self._record_eval({k: float(v) for k, v in res.items()})
        if self.env.enabled:
            dist.barrier()

    def _record_eval(self, res: dict[str, float]) -> None:
        st, key = self.state, self.hooks.best_metric
        st.last_eval = res
        self.metrics.write({"step": st.step, "epoch": st.epoch, **{f"val_{k}": v for k, v in res.items()}})
        if key and key in res and (st.best_value is None or res[key] > st.best_value):
            st.best_value = res[key]
            st.best_eval = dict(res, step=st.step)
            ckpt.save_weights_dir(self.run_dir / ckpt.CKPT_DIR / "best", method_state(self.method),
                                  {"step": st.step, **res, **self.hooks.saved_state()}, self.config_yaml)
        # progress lines go with the bar to stderr: stdout is the command's summary (or its --json line)
        self.bar.write(f"step {st.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()), file=sys.stderr)

    def probe_due(self) -> bool:
        st = self.state
        return self.probe is not None and (st.step % self.probe.every == 0 or st.finished)  # type: ignore[attr-defined]

    def run_probe(self) -> None:
        """Online kNN probe (pretraining), rank 0: eval mode, no gradients, no random draws, so the losses
        are unchanged."""
        if self.probe is None or not self.env.is_main:
            return
        st, t0 = self.state, time.perf_counter()
        with autocast_context(self.env.device, self.cfg.precision):
            self.last_probe = self.probe(unwrap(self.method), self.env.device)
        self.metrics.write({"step": st.step, "epoch": round(st.epoch, 4), **self.last_probe,
                            "probe_s": round(time.perf_counter() - t0, 3)})
        self.bar.write(f"step {st.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in self.last_probe.items()),
                       file=sys.stderr)

    def should_stop(self, stop: _StopFlag) -> bool:
        """A signal or the time limit, agreed by every process; sets the run's status."""
        out_of_time = self.max_minutes > 0 and (time.perf_counter() - self.state.t_start) / 60 >= self.max_minutes
        stop_now = stop.signal is not None or out_of_time
        if self.env.enabled:
            flag = torch.tensor([1.0 if stop_now else 0.0], device=self.env.device)
            dist.all_reduce(flag)
            stop_now = bool(flag.item() > 0)
        if stop_now:
            self.state.status = "interrupted" if stop.signal is not None else "time_limit"
        return stop_now

    def checkpoint_due(self) -> bool:
        return self.state.step % self.cfg.ckpt_every == 0 or self.state.finished

    def save(self) -> None:
        """An atomic checkpoint of everything needed to resume exactly (rank 0 writes, all wait)."""
        st = self.state
        bad = nonfinite_tensors(method_state(self.method))  # every rank: all of them stop together
        if bad:
            raise TrainingError(
                f"the weights are not finite at step {st.step}: {holding_nonfinite(bad)}; not "
                f"saved, the last good checkpoint is kept ({ckpt.latest_checkpoint(self.run_dir) or 'none yet'}). "
                + self.guard.cause(Seen(st.step, float("nan"), float("nan"), self.optimizer.param_groups[0]["lr"])))
        if self.env.is_main:
            ckpt.save_checkpoint(self.run_dir, st.step, method_state(self.method), optimizer=self.optimizer,
                                 scaler=self.scaler, config_yaml=self.config_yaml,
                                 state={"best_value": st.best_value, "best_eval": st.best_eval,
                                        "total_steps": st.total_steps,
                                        **self.hooks.saved_state()})
        if self.env.enabled:
            dist.barrier()

    def result(self) -> TrainResult:
        st = self.state
        return TrainResult(run_dir=self.run_dir, step=st.step, status=st.status, last_metrics=st.last_metrics,
                           last_eval=st.last_eval, best_eval=st.best_eval, trackers=self.trackers)


def train(
    method: nn.Module,
    dataset: Dataset,
    *,
    train_cfg: TrainConfig,
    optim_cfg: OptimConfig,
    run_dir: str | Path,
    config_yaml: str | None = None,
    resume: bool = False,
    val_dataset: Dataset | None = None,
    collate_fn: Callable | None = None,
    desc: str = "train",
    max_minutes: float = 0.0,
    env: DistEnv | None = None,
    probe: Callable[..., dict] | None = None,
    resume_anyway: bool = False,
    inputs: dict[str, str] | None = None,
) -> TrainResult:
    """Train ``method`` on ``dataset``; see the module docstring. Returns where and how it ended.
    ``probe(backbone_method, device) -> metrics``, with an ``every`` attribute (steps), runs at the start and
    every ``probe.every`` steps (the online kNN probe of pretraining). ``run_dir`` is claimed first (lock,
    kind, leftovers); a resume is checked against the saved config and the content of ``inputs`` (config key
    -> file, e.g. the tokenizer) unless ``resume_anyway``."""
    run = Trainer(method, dataset, train_cfg=train_cfg, optim_cfg=optim_cfg, run_dir=run_dir,
                  config_yaml=config_yaml, val_dataset=val_dataset, collate_fn=collate_fn, desc=desc,
                  max_minutes=max_minutes, env=env, probe=probe, resume=resume, resume_anyway=resume_anyway,
                  inputs=inputs)
    run.restore()
    run.wrap()
    batches = run.batches()
    method.train()
    st = run.state
    run.bar = _progress(st.total_steps, st.step, run.env.is_main, desc)
    if st.step == 0:
        run.run_probe()  # the curve starts from the initialisation
    with _StopFlag() as stop:
        try:
            while not st.finished:
                lr = lr_at(st.step, st.total_steps, optim_cfg)
                set_lr(run.optimizer, lr)
                t_step = time.perf_counter()
                metrics = run.optimizer_step(batches)
                run.auto_compile(time.perf_counter() - t_step)
                run.log(metrics, lr)
                if run.eval_due():
                    run.evaluate()
                if run.probe_due():
                    run.run_probe()
                stop_now = run.should_stop(stop)
                if run.checkpoint_due() or stop_now:
                    run.save()
                if stop_now:
                    if run.env.is_main:
                        log.warning("stopped at step %d (%s); resume with --resume", st.step, st.status)
                    break
        except BaseException:
            if run.trackers is not None:
                run.trackers.close(failed=True)
            raise
        finally:
            run.bar.close()
            shutdown_loader(batches)
            del batches
    return run.result()
