"""Training the visual tokenizer: the dVAE objective as an engine method, and the run around it.

DALL-E dVAE (arXiv 2102.12092, Sec. 2.1 and Appendix A.2), as used by BEiT (arXiv 2106.08254, Sec. 2.1.2):

- the encoder's logits over the vocabulary at every grid position are relaxed with Gumbel-softmax
  (temperature ``tau`` annealed from 1 to 1/16, cosine or exponential over ``tau_anneal_fraction`` of the
  run); the decoder reads the soft one-hot code;
- reconstruction: the logit-Laplace negative log-likelihood (Sec. A.3) of the pixels mapped into
  ``[eps, 1 - eps]`` (:func:`beit.models.tokenizer.map_pixels`), or plain MSE (``objective.recon=mse``);
- KL of the per-position code distribution to the uniform prior, weighted by ``beta`` ramped linearly from
  0 to ``kl_weight`` over ``kl_warmup_fraction`` of the run. As in the paper's ELB both terms are sums
  (over sub-pixels and over grid positions); here both are divided by the number of sub-pixels so the loss
  reads in nats per sub-pixel and ``kl_weight`` means the same for every image size.

The VQ-VAE variant (``model.quantizer=vq``) is :class:`beit.tokenizers.vq.VQObjective`.

Plain functions for the CLI: :func:`train_tokenizer`, :func:`build_config`, and
:func:`beit.tokenizers.evaluate.evaluate_cmd`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..config import ConfigError, OptimConfig, TrainConfig, dump_yaml, resolve, to_dict
from ..methods.base import Method
from ..models.tokenizer import (
    LOGIT_LAPLACE_EPS,
    TOKENIZER_PRESETS,
    DVAEConfig,
    Tokenizer,
    map_pixels,
    save_tokenizer,
    stats_to_images,
)

log = logging.getLogger("beit")


# --------------------------------------------------------------------------------------------- configs


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
        if not (self.tau_start > 0 and self.tau_end > 0):
            raise ConfigError("objective.tau_start and objective.tau_end must be > 0")
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"objective.ema_decay must lie in (0, 1), got {self.ema_decay}")
        for k in ("tau_anneal_fraction", "kl_warmup_fraction"):
            if not 0 <= getattr(self, k) <= 1:
                raise ConfigError(f"objective.{k} must lie in [0, 1], got {getattr(self, k)}")


@dataclass
class TokenizerDataConfig:
    path: str = ""  # a folder tree of images (labels, if any, are ignored)
    val_path: str = ""  # optional held-out folder: evaluated (psnr, codebook usage) each epoch and at the end
    limit: int = 0  # use only the first N images in sorted order (0: all)
    val_limit: int = 0
    hflip: bool = True


@dataclass
class TokenizerTrainConfig:
    model: DVAEConfig = field(default_factory=DVAEConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: TokenizerDataConfig = field(default_factory=TokenizerDataConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, min_lr=1e-5, weight_decay=0.0, warmup_fraction=0.02,
                                            clip_grad=1.0)
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=2000, batch_size=64, log_every=20,
                                                                    ckpt_every=500))


def _run_preset(name: str, **extra: Any) -> dict:
    return {"model": to_dict(TOKENIZER_PRESETS[name]), **extra}


# A run preset = the tokenizer architecture of the same name + training defaults sized for it.
RUN_PRESETS: dict[str, dict] = {
    "dvae_32": _run_preset("dvae_32"),
    # measured on CIFAR-10 (docs/results.md): 23.3 dB test PSNR, 99.6% of the codes in use after 20 minutes
    # on 2 CPU cores; MSE reconstruction and a higher lr than the dVAE default get there fastest
    "vq_32": _run_preset("vq_32", objective={"recon": "mse"}, optim={"lr": 2e-3}),
    "dvae_64": _run_preset("dvae_64"),
    "dalle_112": _run_preset(
        "dalle_112",
        optim={"lr": 1e-4, "min_lr": 1.25e-6, "weight_decay": 1e-4},  # DALL-E Appendix A.2
        objective={"kl_weight": 6.6, "tau_anneal_fraction": 0.05, "kl_warmup_fraction": 0.01},
        train={"batch_size": 512, "precision": "bf16"},
    ),
}


def build_config(
    preset: str | None = "dvae_32",
    config: str | Path | None = None,
    overrides: list[str] | dict | None = None,
) -> TokenizerTrainConfig:
    """defaults <- run preset <- YAML file <- ``key=value`` overrides (e.g. ``model.vocab_size=1024``)."""
    return resolve(TokenizerTrainConfig, RUN_PRESETS, preset, config, overrides)


# --------------------------------------------------------------------------------------------- losses


def batch_images(batch: Any) -> torch.Tensor:
    """The image tensor of a batch: a tensor, ``(images, labels)`` or a dict with ``image(s)``."""
    if torch.is_tensor(batch):
        return batch
    if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
        return batch[0]
    if isinstance(batch, dict):
        for k in ("images", "image", "x"):
            if k in batch:
                return batch[k]
    raise TypeError(f"cannot find the images in a batch of type {type(batch).__name__}")


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


@torch.no_grad()
def psnr(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of images in [0, 1] (peak 1), per image; MSE floored at 1e-10 (100 dB)."""
    mse = (rec.float() - x.float()).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp(min=1e-10))


@torch.no_grad()
def code_perplexity(ids: torch.Tensor, vocab_size: int) -> float:
    """exp(entropy) of the empirical code distribution: 1 = one code used, ``vocab_size`` = all equally."""
    p = torch.bincount(ids.flatten(), minlength=vocab_size).double()
    p = p / p.sum().clamp(min=1)
    return float(torch.exp(-(p * torch.log(p.clamp(min=1e-30))).sum()))


# --------------------------------------------------------------------------------------------- methods


class _TokenizerMethod(Method):
    """Shared by the dVAE and VQ objectives: the schedule state, evaluation, engine hooks."""

    best_metric = "psnr"
    state_prefix = "tokenizer."  # the run checkpoints' weights under this prefix are the tokenizer

    def __init__(self, tokenizer: Tokenizer, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.cfg = cfg
        # (step, total_steps) of the schedules: a buffer, so a resumed run continues them exactly
        self.register_buffer("schedule", torch.zeros(2, dtype=torch.long))

    def after_step(self, step: int, total_steps: int) -> None:
        self.schedule.copy_(torch.tensor([step, total_steps]))

    def _progress(self, fraction: float) -> float:
        step, total = (int(v) for v in self.schedule.tolist())
        if total <= 0 or fraction <= 0:
            return 1.0 if total > 0 else 0.0
        return min(1.0, step / (fraction * total))

    @property
    def tau(self) -> float:
        c = self.cfg
        t = self._progress(c.tau_anneal_fraction)
        if c.tau_schedule == "exp":
            return c.tau_start * (c.tau_end / c.tau_start) ** t
        return c.tau_end + (c.tau_start - c.tau_end) * 0.5 * (1 + math.cos(math.pi * t))

    @property
    def kl_weight(self) -> float:
        return self.cfg.kl_weight * self._progress(self.cfg.kl_warmup_fraction)

    @torch.no_grad()
    def evaluate(self, loader) -> dict[str, float]:
        from .evaluate import evaluate_tokenizer

        return evaluate_tokenizer(self.tokenizer, loader)


class DVAEObjective(_TokenizerMethod):
    """Gumbel-softmax dVAE: ``forward(images in [0, 1]) -> (loss, metrics)``."""

    def __init__(self, tokenizer: Tokenizer, cfg: ObjectiveConfig | None = None) -> None:
        if tokenizer.cfg.quantizer != "gumbel":
            raise ConfigError("DVAEObjective trains model.quantizer=gumbel tokenizers; use VQObjective for vq")
        super().__init__(tokenizer, cfg or ObjectiveConfig())

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch_images(batch)
        tok = self.tokenizer
        b, c, h, w = x.shape
        logits = tok.encode_logits(x)  # (B, K, h', w')
        k = logits.shape[1]
        tau = self.tau
        z = F.gumbel_softmax(logits.float(), tau=tau, hard=self.cfg.straight_through, dim=1)  # (B, K, h', w')
        stats = tok.decoder(z.to(logits.dtype))  # (B, 2C, H, W)
        recon = recon_loss(stats, x, self.cfg)
        log_q = F.log_softmax(logits.float(), dim=1)
        kl = (log_q.exp() * (log_q + math.log(k))).sum(1)  # (B, h', w'), KL(q || uniform) per position
        kl_per_subpixel = kl.sum((1, 2)).mean() / (c * h * w)
        beta = self.kl_weight
        loss = recon + beta * kl_per_subpixel
        with torch.no_grad():
            metrics = {
                "recon": float(recon),
                "kl": float(kl.mean()),  # nats per grid position
                "kl_weight": beta,
                "tau": tau,
                "psnr": float(psnr(stats_to_images(stats, c), x).mean()),
                "perplexity": code_perplexity(logits.argmax(1), k),
            }
        return loss, metrics


def build_objective(tokenizer: Tokenizer, cfg: ObjectiveConfig | None = None) -> _TokenizerMethod:
    """The engine method for this tokenizer's quantizer."""
    if tokenizer.cfg.quantizer == "vq":
        from .vq import VQObjective

        return VQObjective(tokenizer, cfg)
    return DVAEObjective(tokenizer, cfg)


# --------------------------------------------------------------------------------------------- data


class _FitShorterSide:
    """Resize (antialiased) so the shorter side is ``size``; untouched if it already is."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img):
        from torchvision.transforms import functional as TF

        if min(img.size) == self.size:
            return img
        return TF.resize(img, self.size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)


def image_transform(img_size: int, train: bool, hflip: bool = True):
    """PIL -> (3, img_size, img_size) float in [0, 1]: shorter side to img_size, random (train) or centre crop."""
    from torchvision import transforms as T

    ops: list = [_FitShorterSide(img_size)]
    if train:
        ops.append(T.RandomCrop(img_size))
        if hflip:
            ops.append(T.RandomHorizontalFlip())
    else:
        ops.append(T.CenterCrop(img_size))
    ops.append(T.ToTensor())
    return T.Compose(ops)


class _Transformed(Dataset):
    """Any dataset yielding PIL images or ``(image, label)``: applies ``transform`` to the image only."""

    def __init__(self, dataset: Dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if isinstance(item, (tuple, list)):
            item = item[0]
        return self.transform(item)


def build_dataset(data: str | Path | Dataset, img_size: int, train: bool, hflip: bool = True,
                  limit: int = 0) -> Dataset:
    """A folder path (:class:`beit.data.ImageFolder`) or any dataset of PIL images -> (3, S, S) tensors."""
    from torch.utils.data import Subset

    from ..data.folder import ImageFolder

    tf = image_transform(img_size, train, hflip)
    if isinstance(data, (str, Path)):
        ds: Dataset = ImageFolder(data, transform=tf)
    else:
        ds = _Transformed(data, tf)
    if limit and limit < len(ds):  # type: ignore[arg-type]
        ds = Subset(ds, range(limit))
    return ds


# --------------------------------------------------------------------------------------------- the run


def train_tokenizer(
    data_dir: str | Path | Dataset | None = None,
    out_dir: str | Path = "runs/tokenizer",
    preset: str | None = "dvae_32",
    steps: int | None = None,
    overrides: list[str] | dict | None = None,
    *,
    config: str | Path | None = None,
    val_dir: str | Path | Dataset | None = None,
    resume: bool = False,
    max_minutes: float = 0.0,
    cfg: TokenizerTrainConfig | None = None,
) -> Path:
    """Train a tokenizer with the shared engine; returns the run directory.

    Writes ``RUN/tokenizer.safetensors`` (load with :func:`beit.tokenizers.load_tokenizer`),
    ``RUN/config.yaml``, ``RUN/metrics.jsonl``, ``RUN/reconstructions.png`` (originals above their
    reconstructions), ``RUN/checkpoints/`` (resume) and, with validation data, ``RUN/eval.json``.
    ``data_dir``/``val_dir`` override ``data.path``/``data.val_path``; ``steps`` overrides ``train.steps``.
    """
    import json

    from ..engine import seed_everything, setup_distributed, train
    from .evaluate import evaluate_tokenizer, reconstruction_grid

    if cfg is None:
        cfg = build_config(preset, config, overrides)
    if steps is not None:
        cfg.train.steps = int(steps)
    data: str | Path | Dataset = data_dir if data_dir is not None else cfg.data.path
    if isinstance(data, (str, Path)):
        if not str(data):
            raise ConfigError("tokenizer training needs data: a folder of images (data.path / --data)")
        cfg.data.path = str(data)
    val: str | Path | Dataset | None = val_dir if val_dir is not None else (cfg.data.val_path or None)
    if isinstance(val, (str, Path)):
        cfg.data.val_path = str(val)

    env = setup_distributed(cfg.train.device)
    seed_everything(cfg.train.seed)
    mc = cfg.model
    dataset = build_dataset(data, mc.img_size, train=True, hflip=cfg.data.hflip, limit=cfg.data.limit)
    val_ds = (build_dataset(val, mc.img_size, train=False, limit=cfg.data.val_limit)
              if val is not None else None)
    tok = Tokenizer(mc)
    method = build_objective(tok, cfg.objective)
    if env.is_main:
        n_params = sum(p.numel() for p in tok.parameters())
        log.info("training a %s tokenizer (%.2fM parameters, %dpx -> %dx%d tokens, vocab %d) on %d images",
                 mc.quantizer, n_params / 1e6, mc.img_size, *mc.grid_size, mc.vocab_size, len(dataset))  # type: ignore[arg-type]
    res = train(method, dataset, train_cfg=cfg.train, optim_cfg=cfg.optim, run_dir=out_dir,
                config_yaml=dump_yaml(cfg), resume=resume, val_dataset=val_ds, desc=f"tokenizer {mc.quantizer}",
                max_minutes=max_minutes, env=env)
    run_dir = Path(res.run_dir)
    if env.is_main:
        tok.eval()
        save_tokenizer(tok, run_dir)
        show = val_ds if val_ds is not None else build_dataset(data, mc.img_size, train=False,
                                                               limit=cfg.data.limit)
        images = torch.stack([show[i] for i in range(min(8, len(show)))])  # type: ignore[arg-type]
        reconstruction_grid(tok, images.to(next(tok.parameters()).device), run_dir / "reconstructions.png")
        if val_ds is not None:
            ev = res.last_eval or evaluate_tokenizer(tok, val_ds)
            (run_dir / "eval.json").write_text(json.dumps({"step": res.step, **ev}, indent=2) + "\n")
        try:
            from ..viz.curves import plot_metrics

            plot_metrics(run_dir / "metrics.jsonl", run_dir / "loss.png",
                         keys=("loss", "recon", "psnr", "perplexity"), title="tokenizer training")
        except Exception as e:  # noqa: BLE001 - a picture must never lose a finished run
            log.debug("no loss.png: %s", e)
    return run_dir


__all__ = [
    "RUN_PRESETS",
    "DVAEObjective",
    "ObjectiveConfig",
    "TokenizerDataConfig",
    "TokenizerTrainConfig",
    "batch_images",
    "build_config",
    "build_dataset",
    "build_objective",
    "code_perplexity",
    "image_transform",
    "logit_laplace_nll",
    "mse_recon",
    "psnr",
    "recon_loss",
    "train_tokenizer",
]
