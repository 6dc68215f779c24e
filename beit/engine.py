"""THE training loop, for every method and task.

A *method* is an ``nn.Module`` whose ``forward(batch)`` returns ``(loss, metrics)``. The loop here owns
everything else: seeded data order and augmentation (so a resumed run replays exactly the batches it would
have seen), optimiser steps with warmup-cosine lr and layer-wise scales, gradient accumulation and
clipping, bf16/fp16 autocast, checkpoints (atomic, safetensors), exact resume, SIGTERM/Ctrl-C, a NaN guard,
DDP under ``torchrun``, a progress bar and ``metrics.jsonl``. It never knows which method it trains.

The hooks it calls on the method, with their defaults, are the contract :class:`beit.methods.base.Method`.
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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import checkpoint as ckpt
from .config import OptimConfig, TrainConfig
from .methods.base import hooks as method_hooks
from .optim import build_optimizer, lr_at, set_lr
from .precision import for_run as precision_for_run

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
            torch.manual_seed(s)
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


class _StopFlag:
    """SIGTERM / Ctrl-C ask the loop to save and stop after the current step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signal = signum
        log.warning("received %s: saving a checkpoint after this step, then stopping",
                    signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed: pip install tensorboard; logging to metrics.jsonl only")

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
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

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
) -> TrainResult:
    """Train ``method`` on ``dataset``; see the module docstring. Returns where and how it ended."""
    env = env or setup_distributed(train_cfg.device)
    run_dir = Path(run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    train_cfg, config_yaml, choice = precision_for_run(train_cfg, env.device, run_dir, resume, config_yaml)
    if env.is_main:
        log.info("precision: %s (%s)", choice.precision, choice.reason)
    total_steps, steps_per_epoch = resolve_steps(train_cfg, len(dataset))  # type: ignore[arg-type]
    micro_total = train_cfg.batch_size // env.world_size
    if train_cfg.batch_size % (env.world_size * train_cfg.accum_steps):
        raise TrainingError(
            f"train.batch_size={train_cfg.batch_size} must be divisible by processes x accum_steps "
            f"= {env.world_size} x {train_cfg.accum_steps}"
        )
    if train_cfg.precision == "fp16" and env.device.type != "cuda":
        raise TrainingError("train.precision=fp16 needs CUDA; use auto, bf16 or fp32 on CPU")

    existing = _existing_checkpoint(run_dir, resume, env.is_main)

    method.to(env.device)
    hooks = method_hooks(method)
    optimizer = build_optimizer(hooks.param_groups(optim_cfg), optim_cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=train_cfg.precision == "fp16")

    start_step = 0
    best_value: float | None = None
    if resume and existing is not None:
        model_state, state, tensors = ckpt.load_checkpoint(existing)
        _load_resumed_weights(method, model_state, existing)
        ckpt.restore_training_state(state, tensors, optimizer, scaler)
        start_step = int(state["step"])
        best_value = state.get("best_value")
        if env.is_main:
            log.info("resumed from %s at step %d", existing, start_step)
        if start_step >= total_steps:
            log.info("run already reached step %d >= %d: nothing to train (raise --steps to continue)",
                     start_step, total_steps)
    elif resume and env.is_main:
        log.info("no checkpoint in %s: starting from scratch", run_dir)

    metrics_out = MetricsWriter(run_dir, env.is_main, train_cfg.tensorboard)
    if start_step:
        metrics_out.truncate_after(start_step)
    elif env.is_main and (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()
    if env.is_main and config_yaml is not None:
        ckpt.write_text_atomically(run_dir / "config.yaml", config_yaml)

    model: nn.Module = method
    if env.enabled:
        model = nn.parallel.DistributedDataParallel(
            method, device_ids=[env.device.index] if env.device.type == "cuda" else None,
            find_unused_parameters=hooks.find_unused_parameters)
    compiled_fallback = model
    if train_cfg.compile:
        try:
            model = torch.compile(model)
        except Exception as e:  # noqa: BLE001 - compile is an optional speed-up
            log.warning("torch.compile unavailable (%s): running eager", e)

    sampler = StepBatchSampler(len(dataset), train_cfg.batch_size, train_cfg.seed, start_step,  # type: ignore[arg-type]
                               total_steps, env.rank, env.world_size, train_cfg.accum_steps)
    loader = DataLoader(SeededDataset(dataset, train_cfg.seed), batch_sampler=sampler,
                        num_workers=train_cfg.num_workers, collate_fn=collate_fn,
                        pin_memory=env.device.type == "cuda", persistent_workers=False,
                        # its own generator: creating the iterator must not draw from the global RNG,
                        # whose state is part of the checkpoint (exact resume)
                        generator=torch.Generator().manual_seed(train_cfg.seed),
                        multiprocessing_context="fork" if train_cfg.num_workers > 0 and os.name == "posix" else None)
    batches = iter(loader)

    method.train()
    sums: dict[str, float] = {}
    count = 0
    images = 0
    t_log = time.perf_counter()
    t_start = time.perf_counter()
    status = "done"
    last_metrics: dict = {}
    last_eval: dict = {}
    best_eval: dict = {}
    step = start_step
    bar = _progress(total_steps, start_step, env.is_main, desc)
    last_probe: dict = {}

    def run_probe(step_: int) -> None:
        # online kNN probe (pretraining): eval mode, no gradients, no random draws, so the losses are unchanged
        nonlocal last_probe
        if probe is not None and env.is_main:
            t0 = time.perf_counter()
            with autocast_context(env.device, train_cfg.precision):
                last_probe = probe(unwrap(method), env.device)
            metrics_out.write({"step": step_, "epoch": round(step_ / steps_per_epoch, 4), **last_probe,
                               "probe_s": round(time.perf_counter() - t0, 3)})
            bar.write(f"step {step_}: " + ", ".join(f"{k} {v:.4g}" for k, v in last_probe.items()))

    if start_step == 0:
        run_probe(0)  # the curve starts from the initialisation

    def save(step_: int) -> None:
        if env.is_main:
            ckpt.save_checkpoint(run_dir, step_, method_state(method), optimizer=optimizer, scaler=scaler,
                                 state={"best_value": best_value, "total_steps": total_steps,
                                        **hooks.saved_state()},
                                 config_yaml=config_yaml)
        if env.enabled:
            dist.barrier()

    def run_eval(step_: int) -> None:
        nonlocal best_value, last_eval, best_eval
        if val_dataset is None:
            return
        if env.is_main:
            vl = DataLoader(val_dataset, batch_size=max(1, micro_total // train_cfg.accum_steps) * 2,
                            shuffle=False, num_workers=train_cfg.num_workers, collate_fn=collate_fn)
            method.eval()
            with torch.no_grad(), autocast_context(env.device, train_cfg.precision):
                res = hooks.evaluate(vl)
            method.train()
            if res:  # a method without validation metrics returns none
                last_eval = {k: float(v) for k, v in res.items()}
                metrics_out.write({"step": step_, "epoch": step_ / steps_per_epoch,
                                   **{f"val_{k}": v for k, v in last_eval.items()}})
                key = hooks.best_metric
                if key and key in last_eval and (best_value is None or last_eval[key] > best_value):
                    best_value = last_eval[key]
                    best_eval = dict(last_eval, step=step_)
                    ckpt.save_weights_dir(run_dir / ckpt.CKPT_DIR / "best", method_state(method),
                                          {"step": step_, **last_eval, **hooks.saved_state()},
                                          config_yaml)
                bar.write(f"step {step_}: " + ", ".join(f"{k} {v:.4g}" for k, v in last_eval.items()))
        if env.enabled:
            dist.barrier()

    with _StopFlag() as stop:
        try:
            while step < total_steps:
                lr = lr_at(step, total_steps, optim_cfg)
                set_lr(optimizer, lr)
                step_metrics: dict[str, float] = {}
                loss_val = 0.0
                for micro in range(train_cfg.accum_steps):
                    batch = to_device(next_batch(batches), env.device)
                    last_micro = micro == train_cfg.accum_steps - 1
                    sync = contextlib.nullcontext() if (last_micro or not env.enabled) else model.no_sync()
                    with sync:
                        with autocast_context(env.device, train_cfg.precision):
                            try:
                                loss, metrics = model(batch)
                            except Exception:
                                if model is compiled_fallback or step > start_step:
                                    raise
                                log.warning("torch.compile failed on the first step: running eager")
                                model = compiled_fallback
                                loss, metrics = model(batch)
                        scaler.scale(loss / train_cfg.accum_steps).backward()
                    loss_val += float(loss.detach()) / train_cfg.accum_steps
                    for k, v in metrics.items():
                        step_metrics[k] = step_metrics.get(k, 0.0) + float(v) / train_cfg.accum_steps
                    images += batch_size_of(batch) * env.world_size
                if not math.isfinite(loss_val):
                    raise TrainingError(
                        f"loss is {loss_val} at step {step + 1}: stopping without saving; the last good "
                        f"checkpoint is kept ({ckpt.latest_checkpoint(run_dir) or 'none yet'}). Lower the "
                        "learning rate, use fp32, or raise optim.clip_grad"
                    )
                if optim_cfg.clip_grad > 0:
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]], optim_cfg.clip_grad)
                    step_metrics["grad_norm"] = float(grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                hooks.after_step(step, total_steps)

                step_metrics["loss"] = loss_val
                for k, v in step_metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                if step % train_cfg.log_every == 0 or step == total_steps:
                    avg = {k: v / count for k, v in sums.items()}
                    if env.enabled:
                        keys = sorted(avg)
                        t = torch.tensor([avg[k] for k in keys], dtype=torch.float64, device=env.device)
                        dist.all_reduce(t)
                        avg = dict(zip(keys, (t / env.world_size).tolist()))
                    dt = time.perf_counter() - t_log
                    row = {"step": step, "epoch": round(step / steps_per_epoch, 4), "lr": lr, **avg,
                           "precision": train_cfg.precision,
                           "images_per_s": images / max(dt, 1e-9), "elapsed_s": time.perf_counter() - t_start}
                    metrics_out.write(row)
                    last_metrics = row
                    shown = {**row, **last_probe}
                    bar.set_postfix({k: f"{shown[k]:.4g}" for k in ("loss", "acc", "mlm_acc", "knn_top1", "lr",
                                                                     "images_per_s") if k in shown}, refresh=False)
                    sums, count, images, t_log = {}, 0, 0, time.perf_counter()
                bar.update(1)

                end_of_epoch = step % steps_per_epoch == 0
                if (train_cfg.eval_every and step % train_cfg.eval_every == 0) or (
                        not train_cfg.eval_every and end_of_epoch) or step == total_steps:
                    run_eval(step)
                if probe is not None and (step % probe.every == 0 or step == total_steps):  # type: ignore[attr-defined]
                    run_probe(step)
                out_of_time = max_minutes > 0 and (time.perf_counter() - t_start) / 60 >= max_minutes
                stop_now = stop.signal is not None or out_of_time
                if env.enabled:
                    flag = torch.tensor([1.0 if stop_now else 0.0], device=env.device)
                    dist.all_reduce(flag)
                    stop_now = bool(flag.item() > 0)
                if step % train_cfg.ckpt_every == 0 or step == total_steps or stop_now:
                    save(step)
                if stop_now:
                    status = "interrupted" if stop.signal is not None else "time_limit"
                    if env.is_main:
                        log.warning("stopped at step %d (%s); resume with --resume", step, status)
                    break
        finally:
            bar.close()
            metrics_out.close()
            del batches
    return TrainResult(run_dir=run_dir, step=step, status=status, last_metrics=last_metrics,
                       last_eval=last_eval, best_eval=best_eval)
