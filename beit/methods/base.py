"""The contract between a training objective and the rest of ``beit``: :class:`Method`.

A *method* turns a batch into a loss and metrics. The engine (:func:`beit.engine.train`) and
:func:`beit.load` use exactly the hooks declared here, each with a default, and nothing else:

========================== ================================================================================
``forward(batch)``         ``(loss, metrics)``: a scalar tensor and a dict of floats / scalar tensors
``param_groups(optim_cfg)`` AdamW parameter groups (default: :func:`beit.optim.param_groups`, no layer decay)
``after_step(step, total)`` called after every optimiser step (EMA teachers, temperature schedules)
``evaluate(loader)``       validation metrics, called each epoch / ``train.eval_every`` (default: none)
``best_metric``            an ``evaluate`` key to maximise: keeps ``checkpoints/best`` (default: none)
``state_prefix``           prefix of the backbone's weights in ``state_dict()``: what ``beit.load`` returns
``backbones``              other named backbones ``beit.load(run, which=NAME)`` may pick (iBOT: student)
``find_unused_parameters`` DDP: some parameters get no gradient in some steps (default: False)
========================== ================================================================================

Subclass :class:`Method` for a new objective. The engine also trains a plain ``nn.Module`` with a
``forward`` of the same shape: :func:`hooks` is the one place that reads a module through this contract,
falling back to :class:`Method`'s defaults for whatever the module does not define.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import OptimConfig
from ..optim import param_groups

__all__ = ["Hooks", "Method", "hooks"]


class Method(nn.Module):
    """Base class of every method and task the engine trains; see the module docstring for the hooks."""

    state_prefix: ClassVar[str] = "model."
    backbones: ClassVar[Mapping[str, str]] = {}
    best_metric: ClassVar[str | None] = None
    find_unused_parameters: bool = False

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        raise NotImplementedError

    def param_groups(self, optim_cfg: OptimConfig) -> list[dict]:
        return param_groups(self, optim_cfg.weight_decay)

    def after_step(self, step: int, total_steps: int) -> None:
        """``step`` is the number of optimiser steps done (1-based), ``total_steps`` the run's length."""

    def evaluate(self, loader: Any) -> dict[str, float]:
        return {}


@dataclass(frozen=True)
class Hooks:
    """The :class:`Method` hooks of one module, resolved once (see :func:`hooks`)."""

    param_groups: Callable[[OptimConfig], list[dict]]
    after_step: Callable[[int, int], None]
    evaluate: Callable[[Any], dict[str, float]]
    best_metric: str | None
    state_prefix: str
    backbones: Mapping[str, str]
    find_unused_parameters: bool

    def saved_state(self) -> dict[str, Any]:
        """What ``beit.load`` needs to find the backbone in a checkpoint (stored in its ``state.json``)."""
        return {"state_prefix": self.state_prefix, "backbones": dict(self.backbones)}


def hooks(module: nn.Module) -> Hooks:
    """The contract as ``module`` fulfils it: its own hooks, :class:`Method`'s defaults for the rest."""

    def bound(name: str) -> Callable:
        own = getattr(module, name, None)
        return own if own is not None else getattr(Method, name).__get__(module)

    def value(name: str) -> Any:
        return getattr(module, name, getattr(Method, name))

    prefix = value("state_prefix")
    if not isinstance(prefix, str):
        raise TypeError(f"{type(module).__name__}.state_prefix must be a str, got {prefix!r}")
    return Hooks(param_groups=bound("param_groups"), after_step=bound("after_step"), evaluate=bound("evaluate"),
                 best_metric=value("best_metric"), state_prefix=prefix, backbones=value("backbones"),
                 find_unused_parameters=bool(value("find_unused_parameters")))
