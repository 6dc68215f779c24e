"""THE training loop, for every method and task.

A *method* is an ``nn.Module`` whose ``forward(batch)`` returns ``(loss, metrics)``. The loop here owns
everything else: seeded data order and augmentation (so a resumed run replays exactly the batches it would
have seen), optimiser steps with warmup-cosine lr and layer-wise scales, gradient accumulation and
clipping, bf16/fp16 autocast, checkpoints (atomic, safetensors), exact resume, SIGTERM/Ctrl-C, a NaN guard,
DDP under ``torchrun``, a progress bar and ``metrics.jsonl``. It never knows which method it trains.

The hooks it calls on the method, with their defaults, are the contract :class:`beit.methods.base.Method`.
Why one file of ~520 lines: :class:`Trainer` is one object whose named steps share its state; the parts
that stand alone (data order, distributed set-up, signals, metrics, the run folder, the lifecycle) are the
package's other modules.

:func:`train` reads as the algorithm; each named step is a method of :class:`Trainer`, around a
:class:`RunState` (step, best value, status, last metrics)::

    restore (checkpoint, optimiser, RNG) -> wrap (DDP, compile) -> batches (seeded order)
    while not finished: set lr -> optimizer_step -> log -> [evaluate] -> [probe] -> [save] -> [stop]
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .. import checkpoint as ckpt
from .. import compiling, tracking
from .. import machine as machine_info
from ..checkpoint_io import holding_nonfinite, nonfinite_tensors
from ..compiling import AUTO_EAGER_STEPS, decide
from ..config import OptimConfig, TrainConfig
from ..data.folder import SKIP_LIST, DropUnreadable, write_skip_list
from ..loading import read_checkpoint
from ..methods.base import hooks as method_hooks
from ..nonfinite import NonFiniteGuard, NonFiniteStepError, Seen, clip_grads, grad_norm
from ..optim import build_optimizer, lr_at, set_lr
from ..precision import for_run as precision_for_run
from ..precision import rank0_value
from ..runs import RunDir
from . import timefit
from .batches import (
    SeededDataset,
    StepBatchSampler,
    batch_size_of,
    ignore_stop_signals,
    next_batch,
    shutdown_loader,
    to_device,
)
from .distributed import DistEnv, setup_distributed
from .folder import prepare_run
from .metrics import MetricsWindow, MetricsWriter
from .signals import StopFlag
from .state import RunState, TrainingError, TrainResult, resolve_steps

log = logging.getLogger("beit")


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


def _progress(total: int, initial: int, enabled: bool, desc: str):
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True,
                mininterval=1.0, leave=True)


class Trainer:
    """One run of :func:`train`: the method, its optimiser, data and outputs, and the named steps of the loop
    (:meth:`restore`, :meth:`batches`, :meth:`optimizer_step`, :meth:`log`, :meth:`evaluate`, :meth:`save`)."""

    def __init__(self, method: nn.Module, dataset: Dataset, *, train_cfg: TrainConfig, optim_cfg: OptimConfig,
                 run_dir: str | Path, config_yaml: str | None = None, val_dataset: Dataset | None = None,
                 collate_fn: Callable | None = None, desc: str = "train", max_minutes: float = 0.0,
                 env: DistEnv | None = None, probe: Callable[..., dict] | None = None, resume: bool = False,
                 resume_anyway: bool = False, inputs: dict[str, str] | None = None, claimed: bool = False) -> None:
        self.env = env or setup_distributed(train_cfg.device)
        self.dataset, self.val_dataset, self.collate_fn = dataset, val_dataset, collate_fn
        # a collate function may leave the batch's last step to the device (uint8 transfer, data.views)
        self.on_device: Callable | None = getattr(collate_fn, "on_device", None)
        self.probe, self.last_probe = probe, {}
        self.run_dir, self.desc, self.resume = Path(run_dir), desc, resume
        self.resume_anyway, self.inputs, self.claimed = resume_anyway, inputs, claimed
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
        # train.fit_to_time with --max-minutes: steady step times until the run's length is fitted (timefit)
        self.fit_times: list[float] | None = [] if train_cfg.fit_to_time and max_minutes > 0 else None
        self.fit_last = 0.0  # when the last loop iteration ended
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler = torch.amp.GradScaler("cuda", enabled=train_cfg.precision == "fp16")
        self.metrics: MetricsWriter | None = None
        self.window = MetricsWindow()
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
        """Claim the run folder unless claimed (:meth:`beit.runs.RunDir.claim`: lock, kind, leftovers); optimiser, then the
        newest intact checkpoint when resuming (weights, optimiser, RNG, step), after checking the resume
        against the saved config and the content of ``inputs`` (unless ``resume_anyway``); a run folder that
        holds checkpoints is never overwritten without ``resume``. Starts ``metrics.jsonl``."""
        resume = self.resume
        existing = prepare_run(self.run_dir, resume, self.env, self.config_yaml, self.inputs,
                               self.resume_anyway, self.claimed)
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
        fitted = int(state.get("total_steps") or 0)
        if self.fit_times is not None and 0 < fitted < self.state.total_steps:  # keeps its fitted length
            self.state.total_steps, self.fit_times = fitted, None
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
        steps_left = self.state.total_steps - self.state.step
        if self.max_minutes > 0:  # a time-limited run has only the steps its minutes allow
            steps_left = min(steps_left, int(self.seconds_left() / max(step_s, 1e-9)))
        choice = decide(self.env.device.type, step_s, steps_left,
                        **({} if cached is None else {"compile_seconds": cached}))
        if choice.compile and not self.state.finished:
            self.compile_now(choice.reason)
        elif self.env.is_main:
            log.info("torch.compile: %s", choice.reason)

    def seconds_left(self) -> float:
        """Of ``--max-minutes``, counted from this process's start."""
        return self.max_minutes * 60.0 - (time.perf_counter() - self.state.t_start)

    def fit_to_time(self) -> None:
        """``train.fit_to_time``, at the end of each loop iteration: once the steady pace (whole iterations:
        step, logging, saves) is known, shorten the run to the steps its minutes allow, so that its schedule
        completes (:mod:`beit.engine.timefit`); rank 0's length for every process."""
        st, times, now = self.state, self.fit_times, time.perf_counter()
        last, self.fit_last = self.fit_last, now
        if times is None or (self.cfg.compile == "auto" and not self.compile_decided) or st.finished:
            return
        if st.step <= st.start_step + 1 or (self.model is not self.eager and st.step <= self.compiled_at + 1):
            return  # the first iteration holds the start-up, the first compiled one the compile time
        times.append(now - last)
        if not timefit.ready(times):
            return
        self.fit_times = None
        total = int(rank0_value(timefit.fitted_total(st.step, st.total_steps, times, self.seconds_left()),
                                self.env.device))
        if total < st.total_steps and self.env.is_main:
            log.info("run fitted to --max-minutes %g: %d steps instead of %d (%.3f s per step)", self.max_minutes,
                     total, st.total_steps, sum(times) / len(times))
            self.metrics.write({"step": st.step, "fitted_total_steps": total, "pace_s": sum(times) / len(times)})
            if self.bar is not None:
                self.bar.total = total
                self.bar.refresh()
        st.total_steps = min(st.total_steps, total)

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
                            worker_init_fn=ignore_stop_signals,
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
            self.window = MetricsWindow()
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
                            worker_init_fn=ignore_stop_signals)
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

    def should_stop(self, stop: StopFlag) -> bool:
        """A signal or the time limit, agreed by every process; sets the run's status."""
        out_of_time = self.max_minutes > 0 and self.seconds_left() <= 0
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
    claimed: bool = False,
) -> TrainResult:
    """Train ``method`` on ``dataset``; see the module docstring. Returns where and how it ended.
    ``probe(backbone_method, device) -> metrics``, with an ``every`` attribute (steps), runs at the start and
    every ``probe.every`` steps (the online kNN probe of pretraining). ``run_dir`` is claimed first (lock,
    kind, leftovers) unless ``claimed`` (:func:`beit.engine.run` claims it once, before the task writes into
    it); a resume is checked against the saved config and the content of ``inputs`` (config key -> file, e.g.
    the tokenizer) unless ``resume_anyway``."""
    run = Trainer(method, dataset, train_cfg=train_cfg, optim_cfg=optim_cfg, run_dir=run_dir,
                  config_yaml=config_yaml, val_dataset=val_dataset, collate_fn=collate_fn, desc=desc,
                  max_minutes=max_minutes, env=env, probe=probe, resume=resume, resume_anyway=resume_anyway,
                  inputs=inputs, claimed=claimed)
    run.restore()
    run.wrap()
    batches = run.batches()
    method.train()
    st = run.state
    run.bar = _progress(st.total_steps, st.step, run.env.is_main, desc)
    if st.step == 0:
        run.run_probe()  # the curve starts from the initialisation
    with StopFlag() as stop:
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
                run.fit_to_time()
        except BaseException:
            if run.trackers is not None:
                run.trackers.close(failed=True)
            raise
        finally:
            run.bar.close()
            shutdown_loader(batches)
            del batches
    return run.result()
