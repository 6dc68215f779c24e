"""The training loop's guard against non-finite steps: ``train.nonfinite=stop|skip`` (issue 26).

Every optimiser step is judged on its loss and on the global L2 norm of its gradients (the norm that
clipping computes; computed the same way when clipping is off). Both are read on the host once per step,
right after the loss already is, so the guard adds no synchronisation point of its own. A step whose loss
or gradient norm is NaN or inf:

* ``stop`` (default): the run ends before the update, with one message naming what was seen (the loss,
  the gradient norm, which gradients or weights went non-finite first) and the likely cause;
* ``skip``: the update is skipped (the step still counts, so the data order and schedule stay those of an
  exact resume); more than ``train.max_nonfinite_skips`` skipped steps in a row stop the run the same way.

With fp16, an overflowing gradient (finite loss) is the loss scaler's signal: the scaler skips the update
and lowers its scale under either policy, bounded by the same count. Weights that are themselves NaN or inf
cannot be helped by skipping, so they stop the run under either policy. Whatever stops, nothing non-finite
is written: :func:`beit.checkpoint.save_checkpoint` refuses it too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint_io import describe_tensors, nonfinite_tensors


class NonFiniteStepError(RuntimeError):
    """The run must stop: a non-finite step under ``train.nonfinite=stop``, too many skipped in a row, or
    weights that are themselves NaN/inf. The message names what was seen and the likely cause."""


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients of ``params`` (a 0-d tensor on their device; not read here)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: one fused norm per device
    if total is not None:
        return total(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()) for g in grads]))


def clip_grads(params: list[torch.Tensor], clip: float, norm: torch.Tensor) -> None:
    """Scale the gradients so that their global norm ``norm`` is at most ``clip`` (``clip_grad_norm_``'s
    arithmetic). Only called with a finite norm: a NaN one would turn every gradient into NaN and hide which
    went non-finite first."""
    grads = [p.grad for p in params if p.grad is not None]
    with_norm = getattr(torch.nn.utils, "clip_grads_with_norm_", None)
    if with_norm is not None:
        with_norm(params, clip, norm)
        return
    coef = torch.clamp(clip / (norm + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(g.device))


@dataclass
class Seen:
    """What one step looked like, for the message."""

    step: int
    loss: float
    norm: float
    lr: float


class NonFiniteGuard:
    """Decides, step by step, whether to update, skip or stop (see the module docstring)."""

    def __init__(self, module: nn.Module, policy: str, max_skips: int, loss_scaling: bool) -> None:
        self.module, self.policy, self.max_skips, self.loss_scaling = module, policy, max_skips, loss_scaling
        self.in_a_row = 0  # consecutive skipped steps
        self.skipped = 0  # skipped steps in this process's part of the run

    def judge(self, seen: Seen, last_good: Callable[[], str]) -> bool:
        """True to update, False to skip; :class:`NonFiniteStepError` to stop. ``last_good()`` names the
        checkpoint that stays the run's latest (asked only for the message)."""
        if math.isfinite(seen.loss) and math.isfinite(seen.norm):
            self.in_a_row = 0
            return True
        bad_weights = nonfinite_tensors(dict(self.module.named_parameters()))
        overflow = self.loss_scaling and math.isfinite(seen.loss)
        if not bad_weights and (self.policy == "skip" or overflow) and self.in_a_row < self.max_skips:
            self.in_a_row += 1
            self.skipped += 1
            return False
        raise NonFiniteStepError(self.message(seen, bad_weights, last_good()))

    def message(self, seen: Seen, bad_weights: list[str], last_good: str) -> str:
        what = (f"the loss is {seen.loss}" if not math.isfinite(seen.loss)
                else f"the gradient norm is {seen.norm} (loss {seen.loss:.4g})")
        if self.in_a_row:
            what += f", {self.in_a_row + 1} non-finite steps in a row (train.max_nonfinite_skips={self.max_skips})"
        if bad_weights:
            first = f"the weights themselves are not finite: {describe_tensors(bad_weights)}"
        else:
            grads = {n: p.grad for n, p in self.module.named_parameters() if p.grad is not None}
            bad_grads = nonfinite_tensors(grads)
            first = f"non-finite gradients in {describe_tensors(bad_grads)}" if bad_grads else "weights finite"
            # an overflow (inf) is where it started; NaN is what inf - inf and 0 * inf spread from there
            overflow = [n for n in bad_grads if torch.isinf(grads[n]).any()]
            if overflow and len(overflow) < len(bad_grads):
                first += f", of which {describe_tensors(overflow)} overflowed to inf"
        return (f"{what} at step {seen.step}: stopping without saving; the last good checkpoint is kept "
                f"({last_good}). Seen: {first}. {self.cause(seen)}")

    def cause(self, seen: Seen) -> str:
        """The likely cause, from what the step looked like."""
        big = math.isfinite(seen.loss) and abs(seen.loss) > 1e4
        skip = "" if self.policy == "skip" else "; or pass train.nonfinite=skip to skip isolated bad steps"
        if big or seen.lr >= 0.1:
            return (f"Likely cause: the learning rate (optim.lr={seen.lr:g} at this step) is too high: the loss "
                    f"diverged{' to ' + format(seen.loss, '.3g') if big else ''}. Lower optim.lr (e.g. 10x), "
                    f"lengthen the warmup, keep optim.clip_grad > 0{skip}")
        return ("Likely cause: an overflow in the forward or backward pass (low precision, extreme inputs) or a "
                f"learning rate too high for this run: lower optim.lr, use --precision fp32, or keep "
                f"optim.clip_grad > 0{skip}")


__all__ = ["NonFiniteGuard", "NonFiniteStepError", "Seen", "clip_grads", "grad_norm"]
