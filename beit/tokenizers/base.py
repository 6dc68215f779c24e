"""What every tokenizer objective shares: the objective config, reconstruction losses and metrics,
:class:`TokenizerObjective`, the engine method they subclass (:mod:`.gumbel`, :mod:`.vq`, :mod:`.vqkd`), and
:class:`TokenizerTraining`, the part of the lifecycle task every tokenizer run shares (:mod:`.train`).

Reconstruction (DALL-E, arXiv 2102.12092, Sec. A.3): the logit-Laplace negative log-likelihood of the pixels
mapped into ``[eps, 1 - eps]`` (:func:`beit.models.tokenizer.map_pixels`), or plain MSE (``objective.recon=mse``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..config import ConfigError, check_fields
from ..engine import Training, TrainingTask, TrainResult
from ..methods.base import Method
from ..models.tokenizer import LOGIT_LAPLACE_EPS, Tokenizer, map_pixels, save_tokenizer
from .metrics import batch_images, code_perplexity, evaluate_tokenizer, psnr

__all__ = [
    "ObjectiveConfig",
    "TokenizerObjective",
    "TokenizerTraining",
    "batch_images",
    "code_perplexity",
    "logit_laplace_nll",
    "mse_recon",
    "psnr",
    "recon_loss",
]


@dataclass
class ObjectiveConfig:
    """Knobs of the tokenizer objective (both quantizers; the ``vq`` ones are ignored by ``gumbel``)."""

    recon: str = "logit_laplace"  # logit_laplace (DALL-E) | mse
    # gumbel (dVAE)
    tau_start: float = 1.0
    tau_end: float = 1 / 16
    tau_schedule: str = "cosine"  # cosine | exp
    tau_anneal_fraction: float = 0.8  # share of the run over which tau goes from start to end
    kl_weight: float = 1.0  # beta at the end of its ramp; nats/sub-pixel scale (see the module docstring)
    kl_warmup_fraction: float = 0.1  # beta ramps linearly 0 -> kl_weight over this share of the run
    logscale_min: float = -7.0  # floor on the logit-Laplace log-scale: keeps exp(-log b) finite
    # decoder reads the hard one-hot sample, gradients through the soft one (taming-transformers'
    # GumbelQuantize); false = DALL-E's soft relaxation, which on short runs lets information flow through
    # the soft weights while the argmax code collapses (measured on CIFAR-10: perplexity 1 after 80 steps)
    straight_through: bool = True
    # vq (VQ-VAE with EMA codebook, arXiv 1711.00937 Sec. 3.2 / Appendix A.1)
    commitment: float = 0.25
    ema_decay: float = 0.99
    dead_code_threshold: float = 0.1  # codes whose EMA count per batch falls below this are restarted

    def __post_init__(self) -> None:
        if self.recon not in ("logit_laplace", "mse"):
            raise ConfigError(f"objective.recon must be logit_laplace or mse, got {self.recon!r}")
        if self.tau_schedule not in ("cosine", "exp"):
            raise ConfigError(f"objective.tau_schedule must be cosine or exp, got {self.tau_schedule!r}")
        check_fields(self, "objective", {"kl_weight commitment dead_code_threshold": "nonneg",
                                         "logscale_min": "finite"})
        if not (self.tau_start > 0 and self.tau_end > 0):
            raise ConfigError("objective.tau_start and objective.tau_end must be > 0")
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"objective.ema_decay must lie in (0, 1), got {self.ema_decay}")
        for k in ("tau_anneal_fraction", "kl_warmup_fraction"):
            if not 0 <= getattr(self, k) <= 1:
                raise ConfigError(f"objective.{k} must lie in [0, 1], got {getattr(self, k)}")



def logit_laplace_nll(stats: torch.Tensor, x: torch.Tensor, logscale_min: float = -7.0) -> torch.Tensor:
    """Mean NLL (nats per sub-pixel) of ``x`` in [0, 1] under the decoder's logit-Laplace (DALL-E Eq. in A.3).

    ``f(y | mu, b) = exp(-|logit(y) - mu| / b) / (2 b y (1 - y))`` with ``y = map_pixels(x)``;
    ``stats`` (B, 2C, H, W) holds ``mu`` then ``log b``.
    """
    c = x.shape[1]
    mu, log_b = stats[:, :c].float(), stats[:, c:].float().clamp(min=logscale_min)
    y = map_pixels(x.float())
    nll = math.log(2) + log_b + torch.log(y * (1 - y)) + (torch.logit(y) - mu).abs() * torch.exp(-log_b)
    return nll.mean()


def mse_recon(stats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """MSE in pixel units between ``x`` and the decoder's median ``unmap(sigmoid(mu))`` (unclamped)."""
    c = x.shape[1]
    rec = (torch.sigmoid(stats[:, :c].float()) - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)
    return F.mse_loss(rec, x.float())


def recon_loss(stats: torch.Tensor, x: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    if cfg.recon == "mse":
        return mse_recon(stats, x)
    return logit_laplace_nll(stats, x, cfg.logscale_min)


class TokenizerObjective(Method):
    """Base of the tokenizer objectives: the tokenizer, the schedule state, evaluation (PSNR, codebook use).

    A subclass implements ``forward(batch) -> (loss, metrics)`` for one ``model.quantizer``."""

    best_metric = "psnr"
    state_prefix = "tokenizer."  # the run checkpoints' weights under this prefix are the tokenizer

    def __init__(self, tokenizer: Tokenizer, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.cfg = cfg
        # (step, total_steps) of the schedules: a buffer, so a resumed run continues them exactly
        self.register_buffer("schedule", torch.zeros(2, dtype=torch.long))
        # codebook updates (EMA, dead-code restarts) queued by forward and applied after the optimiser step:
        # an update inside forward would change a buffer that a compiled graph saved for its backward
        # (torch.compile's partitioner may keep the codebook and recompute the looked-up codes from it)
        self._pending: list[tuple[torch.Tensor, ...]] = []

    def after_step(self, step: int, total_steps: int) -> None:
        self.schedule.copy_(torch.tensor([step, total_steps]))
        pending, self._pending = self._pending, []
        for args in pending:  # one per micro-batch, in order
            self.update_codebook(*args)

    def defer_codebook_update(self, *args: torch.Tensor) -> None:
        """Queue ``update_codebook(*args)`` for the end of this optimiser step (training mode only)."""
        if self.training:
            self._pending.append(args)

    def update_codebook(self, *args: torch.Tensor) -> None:
        """The objective's codebook update from one micro-batch (objectives without a codebook have none)."""

    def progress(self, fraction: float) -> float:
        """Share (0..1) of a schedule that runs over ``fraction`` of the run, at the current step."""
        step, total = (int(v) for v in self.schedule.tolist())
        if total <= 0 or fraction <= 0:
            return 1.0 if total > 0 else 0.0
        return min(1.0, step / (fraction * total))

    @torch.no_grad()
    def evaluate(self, loader) -> dict[str, float]:
        return evaluate_tokenizer(self.tokenizer, loader)


class TokenizerTraining(TrainingTask):
    """The lifecycle task of a tokenizer run (:func:`beit.engine.run`), the part every objective shares: its
    images (``data``/``val``: folders or datasets, :func:`beit.data.tokenizer.resolve_data`) and its product,
    the trained tokenizer saved as ``tokenizer.safetensors`` (``beit.load`` and ``--tokenizer`` read it) with,
    given held-out images, ``eval.json``. ``build`` (the objective and its model) is each objective's."""

    def __init__(self, data: str | Path | Dataset, val: str | Path | Dataset | None) -> None:
        self.data, self.val = data, val

    def save(self, training: Training, result: TrainResult) -> None:
        run_dir, method = Path(result.run_dir), training.method
        method.tokenizer.eval()
        save_tokenizer(method.tokenizer, run_dir)
        if training.val_dataset is not None:
            ev = result.last_eval or method.evaluate(training.val_dataset)
            (run_dir / "eval.json").write_text(json.dumps({"step": result.step, **ev}, indent=2) + "\n")
