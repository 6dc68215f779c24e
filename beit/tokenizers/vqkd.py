"""VQ-KD objective (BEiT v2, arXiv 2208.06366, Sec. 2.2): vector-quantized knowledge distillation.

- the teacher: any backbone :func:`beit.load` reads (this toolkit's MAE / iBOT / BEiT runs, HF / timm /
  official files), frozen, fed the image at its own resolution and normalisation; its patch features at
  block ``vqkd.teacher_block`` (after its final norm) are the target, resized to the tokenizer's grid if
  the grids differ;
- quantize (Eq. 1): the encoder's l2-normalised vectors go to the codebook row of highest cosine similarity;
  the decoder reads ``z + sg(z_q - z)`` (straight-through estimator);
- loss (Eq. 2): ``1 - cos(decoder output, teacher feature)`` per patch, plus ``commitment * ||z - sg(z_q)||^2``
  (official ``beta = 1``);
- the codebook is not learnt by gradient: each used row moves to ``l2norm(decay * e + (1 - decay) * mean)``
  where ``mean`` is the l2-normalised average of the vectors assigned to it in the batch (official
  ``NormEMAVectorQuantizer``, decay 0.99). It starts from encoder outputs of the first batch, and rows whose
  EMA count per batch falls below ``dead_code_threshold`` are restarted at random encoder outputs of the batch.

The teacher runs in fp32 by default (``vqkd.teacher_precision``): the targets must not depend on the machine's
precision (docs/tokenizer.md has the bf16-vs-fp32 cosine measured on a trained teacher).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError, check_fields
from ..loading import load
from ..models.vit import VisionTransformer
from ..models.vqkd import IMAGENET_MEAN, IMAGENET_STD, VQKDTokenizer, l2norm
from .base import TokenizerObjective, batch_images, code_perplexity

__all__ = ["Teacher", "VQKDObjective", "VQKDObjectiveConfig", "ema_codebook_update", "evaluate_vqkd"]


@dataclass
class VQKDObjectiveConfig:
    """The ``vqkd`` section of a VQ-KD tokenizer run."""

    teacher: str = ""  # anything beit.load reads that holds a backbone
    teacher_block: int = -1  # the block whose patch tokens are the target (0-based; -1: the last)
    teacher_precision: str = "fp32"  # fp32 | bf16 (the teacher's forward only)
    teacher_mean: tuple[float, float, float] = IMAGENET_MEAN  # the normalisation the teacher was trained with
    teacher_std: tuple[float, float, float] = IMAGENET_STD
    commitment: float = 1.0  # beta of the official quantizer
    ema_decay: float = 0.99  # the paper's codebook EMA decay
    dead_code_threshold: float = 0.03  # EMA count per batch under which a code is restarted (0: never)

    def __post_init__(self) -> None:
        if self.teacher_precision not in ("fp32", "bf16"):
            raise ConfigError(f"vqkd.teacher_precision must be fp32 or bf16, got {self.teacher_precision!r}")
        check_fields(self, "vqkd", {"commitment dead_code_threshold": "nonneg", "teacher_std": "positive",
                                    "teacher_mean": "finite"})
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"vqkd.ema_decay must lie in (0, 1), got {self.ema_decay}")


def _ddp() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# --------------------------------------------------------------------------------------------- the teacher


class Teacher:
    """A frozen backbone's patch features: ``features(images in [0, 1], grid) -> (B, h*w, C)`` float32.

    Not an ``nn.Module`` on purpose: it must stay out of the objective's parameters, state dict and
    ``train()`` (the engine would otherwise optimise, save and un-freeze it)."""

    def __init__(self, model: nn.Module, block: int = -1, precision: str = "fp32",
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        if not isinstance(model, VisionTransformer):
            raise ConfigError(f"the VQ-KD teacher must be a backbone (a vision transformer), got {type(model).__name__}")
        depth = len(model.blocks)
        if not -depth <= block < depth:
            raise ConfigError(f"vqkd.teacher_block={block} is out of range for a teacher of {depth} blocks")
        self.model = model.eval().requires_grad_(False)
        self.block = block % depth
        self.precision = precision
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def load(cls, path: str, block: int = -1, precision: str = "fp32", mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Teacher:
        if not path:
            raise ConfigError("VQ-KD distils a teacher: pass --teacher PATH (a run or a backbone beit.load reads)")
        model = load(path)
        if not isinstance(model, VisionTransformer):
            raise ConfigError(f"--teacher {path} is a tokenizer, not a backbone: give a pretraining run or a "
                              "backbone checkpoint")
        return cls(model, block, precision, mean, std)

    @property
    def dim(self) -> int:
        return int(self.model.embed_dim)

    @torch.no_grad()
    def features(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, h*w, C) float32 patch features on the ``grid`` (h, w)."""
        m = self.model
        if next(m.parameters()).device != images.device:
            m.to(images.device)
        x = images.float()
        size = m.patch_embed.img_hw
        if tuple(x.shape[-2:]) != tuple(size):  # the teacher sees the image at its own resolution
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        bf16 = self.precision == "bf16"
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            tokens = m.get_intermediate_layers(x, [self.block])[0]  # (B, 1+N, C), before the final norm
            tokens = m.norm(tokens)[:, 1:]  # (B, N, C)
        tokens = tokens.float()
        th, tw = m.grid_size
        if (th, tw) != tuple(grid):
            fmap = tokens.transpose(1, 2).reshape(len(tokens), -1, th, tw)  # (B, C, th, tw)
            fmap = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False, antialias=True)
            tokens = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C)
        return tokens


# --------------------------------------------------------------------------------------------- codebook


@torch.no_grad()
def ema_codebook_update(codebook: torch.Tensor, cluster_size: torch.Tensor, z: torch.Tensor, ids: torch.Tensor,
                        decay: float) -> torch.Tensor:
    """One normalised-EMA step, in place. ``codebook`` (K, D) unit rows, ``cluster_size`` (K,) EMA counts,
    ``z`` (N, D) unit vectors, ``ids`` (N,) their codes. Returns the batch's counts (K,).

    ``cluster_size <- decay * cluster_size + (1 - decay) * counts``; a code with ``counts > 0`` moves to
    ``l2norm(decay * e + (1 - decay) * l2norm(mean of its vectors))``; the others stay."""
    k = codebook.shape[0]
    counts = torch.bincount(ids, minlength=k).to(z.dtype)  # (K,)
    sums = torch.zeros_like(codebook, dtype=z.dtype).index_add_(0, ids, z)  # (K, D)
    if _ddp():
        dist.all_reduce(counts)
        dist.all_reduce(sums)
    cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
    used = counts > 0
    mean = l2norm(sums / counts.clamp(min=1)[:, None])  # (K, D)
    moved = l2norm(decay * codebook + (1 - decay) * mean)
    codebook.copy_(torch.where(used[:, None], moved, codebook))
    return counts


def _sample(z: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` random rows of ``z`` (with replacement if there are fewer), identical on every rank."""
    idx = torch.randint(len(z), (n,), device=z.device) if len(z) < n else torch.randperm(len(z), device=z.device)[:n]
    out = z[idx].clone()
    if _ddp():
        dist.broadcast(out, 0)
    return out


# --------------------------------------------------------------------------------------------- objective


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over patches of ``1 - cos(pred, target)`` (BEiT v2 Eq. 2), in fp32."""
    return (1 - (l2norm(pred.float()) * l2norm(target.float())).sum(-1)).mean()


class VQKDObjective(TokenizerObjective):
    """``forward(images in [0, 1]) -> (loss, metrics)`` for a :class:`VQKDTokenizer` and its teacher."""

    best_metric = "teacher_cos"

    def __init__(self, tokenizer: VQKDTokenizer, teacher: Teacher, cfg: VQKDObjectiveConfig | None = None) -> None:
        cfg = cfg or VQKDObjectiveConfig()
        super().__init__(tokenizer, cfg)  # type: ignore[arg-type]
        if tokenizer.cfg.target_dim != teacher.dim:
            raise ConfigError(f"the tokenizer reconstructs {tokenizer.cfg.target_dim}-d features but the teacher's "
                              f"are {teacher.dim}-d (model.target_dim)")
        self.__dict__["teacher"] = teacher  # not a submodule: see Teacher
        # EMA counts: training state (in the run checkpoints), not part of the saved tokenizer
        self.register_buffer("cluster_size", torch.zeros(tokenizer.vocab_size))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def update_codebook(self, z: torch.Tensor, ids: torch.Tensor) -> None:
        cb = self.tokenizer.codebook
        ema_codebook_update(cb, self.cluster_size, z, ids, self.cfg.ema_decay)
        dead = self.cluster_size < self.cfg.dead_code_threshold  # (K,) bool
        n_dead = int(dead.sum())
        if n_dead:
            # restarted at data points with the threshold as count: a code that wins no vector in the next batch
            # falls under it again and is re-sampled at once (Jukebox), instead of idling ~log(thr)/log(decay)
            # steps (350 at 0.03 and 0.99) as it would with a count of 1. Measured (docs/tokenizer.md): held-out
            # codebook use 50% instead of 14% after 150 steps, the same teacher cosine
            cb[dead] = _sample(z, n_dead)
            self.cluster_size[dead] = self.cfg.dead_code_threshold

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch_images(batch)
        tok: VQKDTokenizer = self.tokenizer  # type: ignore[assignment]
        target = self.teacher.features(x, tok.grid_size)  # (B, N, C) float32, no gradient
        z = tok.encode_vectors(x).float()  # (B, h, w, D) unit vectors
        flat = z.reshape(-1, z.shape[-1])  # (B*h*w, D)
        if self.training and not bool(self.initialized):
            # codes start at data points (official: k-means on the first batch), so none starts far from the data
            tok.codebook.copy_(_sample(flat.detach(), tok.vocab_size))
            self.initialized.fill_(True)
        ids = tok.nearest_code(flat.detach())  # (B*h*w,)
        z_q = tok.codebook[ids].reshape(z.shape)  # (B, h, w, D)
        commit = F.mse_loss(z, z_q.detach())
        z_st = z + (z_q - z).detach()  # straight-through: the decoder's gradient reaches the encoder
        pred = tok.decode_features(z_st)  # (B, N, C)
        rec = cosine_loss(pred, target)
        loss = rec + self.cfg.commitment * commit
        self.defer_codebook_update(flat.detach(), ids)  # applied after the optimiser step
        with torch.no_grad():
            metrics = {"rec": float(rec), "commit": float(commit), "teacher_cos": 1.0 - float(rec),
                       "perplexity": code_perplexity(ids, tok.vocab_size),
                       "batch_usage": float((torch.bincount(ids, minlength=tok.vocab_size) > 0).float().mean())}
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, loader) -> dict[str, float]:
        return evaluate_vqkd(self.tokenizer, self.teacher, loader)  # type: ignore[arg-type]


@torch.no_grad()
def evaluate_vqkd(tok: VQKDTokenizer, teacher: Teacher, data: Dataset | DataLoader | torch.Tensor,
                  batch_size: int = 128) -> dict[str, float]:
    """``{"codebook_usage", "perplexity", "teacher_cos", "num_images"}`` over held-out [0, 1] images.

    ``teacher_cos``: mean cosine between the teacher's features and the decoder's reconstruction from the
    hard codes (what the ids keep of the teacher); ``codebook_usage``: share of the codes used at least once;
    ``perplexity``: exp(entropy) of the code frequencies."""
    if isinstance(data, torch.Tensor):
        batches: Any = data.split(batch_size)
    elif isinstance(data, DataLoader):
        batches = data
    else:
        batches = DataLoader(data, batch_size=batch_size, shuffle=False)
    was_training = tok.training
    tok.eval()
    device = tok.codebook.device
    counts = torch.zeros(tok.vocab_size, dtype=torch.float64, device=device)
    cos_sum, n_patches, n = 0.0, 0, 0
    for batch in batches:
        x = batch_images(batch).to(device).float()
        with torch.autocast(device.type, enabled=False):
            ids = tok.encode(x)  # (B, h, w)
            pred = tok.decode_features(tok.codebook[ids])  # (B, N, C)
            target = teacher.features(x, tok.grid_size)
        cos = (l2norm(pred.float()) * l2norm(target)).sum(-1)  # (B, N)
        cos_sum += float(cos.sum())
        n_patches += cos.numel()
        n += len(x)
        counts += torch.bincount(ids.flatten(), minlength=tok.vocab_size).double()
    tok.train(was_training)
    if n == 0:
        raise ValueError("evaluate_vqkd got no images")
    p = counts / counts.sum()
    return {"codebook_usage": float((counts > 0).double().mean()),
            "perplexity": float(torch.exp(-(p * torch.log(p.clamp(min=1e-30))).sum())),
            "teacher_cos": cos_sum / n_patches, "num_images": n}

