"""VQ-VAE objective (arXiv 1711.00937): nearest codebook entry, straight-through gradients, EMA codebook.

- quantize: each encoder vector goes to its nearest codebook row (squared L2);
- the decoder reads ``z + (z_q - z).detach()`` (straight-through estimator, Sec. 3.1);
- loss = reconstruction + ``commitment`` * ||z - sg(z_q)||^2; the codebook is not learnt by gradient but
  as an exponential moving average of the vectors assigned to each code (Appendix A.1, decay 0.99, with
  Laplace smoothing of the counts);
- the codebook starts from random encoder outputs of the first batch, and codes whose EMA count per batch
  falls below ``dead_code_threshold`` are restarted at random encoder outputs of the current batch (as in
  Jukebox / SoundStream), which keeps most of the vocabulary in use.

Implemented here (~70 lines) rather than with ``vector-quantize-pytorch``: it adds dependencies for one
function, names its buffers its own way (our saved tokenizer keeps one ``codebook.embed``), and we need
the EMA statistics synchronised across DDP ranks, which is two ``all_reduce`` calls.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import ConfigError
from ..models.tokenizer import Tokenizer, map_pixels, stats_to_images
from .base import ObjectiveConfig, TokenizerObjective, batch_images, code_perplexity, psnr, recon_loss


def _ddp() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VQObjective(TokenizerObjective):
    """VQ-VAE with EMA codebook: ``forward(images in [0, 1]) -> (loss, metrics)``."""

    def __init__(self, tokenizer: Tokenizer, cfg: ObjectiveConfig | None = None) -> None:
        if tokenizer.cfg.quantizer != "vq" or tokenizer.codebook is None:
            raise ConfigError("VQObjective trains model.quantizer=vq tokenizers")
        super().__init__(tokenizer, cfg or ObjectiveConfig())
        k, d = tokenizer.codebook.embed.shape
        # EMA statistics: training state (in the run checkpoints), not part of the saved tokenizer
        self.register_buffer("cluster_size", torch.ones(k))
        self.register_buffer("embed_sum", tokenizer.codebook.embed.detach().clone())
        self.register_buffer("initialized", torch.tensor(False))

    def _sample(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` random rows of ``flat`` (with replacement if there are fewer), identical on every rank."""
        idx = torch.randint(len(flat), (n,), device=flat.device) if len(flat) < n else \
            torch.randperm(len(flat), device=flat.device)[:n]
        out = flat[idx].clone()
        if _ddp():
            dist.broadcast(out, 0)
        return out

    @torch.no_grad()
    def update_codebook(self, flat: torch.Tensor, ids: torch.Tensor) -> None:
        embed = self.tokenizer.codebook.embed  # type: ignore[union-attr]
        k = embed.shape[0]
        if not bool(self.initialized):
            # codes start at data points with no EMA mass: after the first update every code that did not
            # win a fair share of the batch is restarted at once, instead of idling until its initial count
            # decays (~230 steps at decay 0.99), which is most of a short CPU run
            embed.copy_(self._sample(flat, k))
            self.embed_sum.zero_()
            self.cluster_size.zero_()
            self.initialized.fill_(True)
            return
        counts = torch.bincount(ids, minlength=k).float()  # (K,)
        sums = torch.zeros_like(embed).index_add_(0, ids, flat)  # (K, D)
        if _ddp():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        decay = self.cfg.ema_decay
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + 1e-5) / (n + k * 1e-5) * n  # Laplace smoothing: no division by 0
        embed.copy_(self.embed_sum / smoothed[:, None])
        dead = self.cluster_size < self.cfg.dead_code_threshold  # (K,) bool
        n_dead = int(dead.sum())
        if n_dead:
            fresh = self._sample(flat, n_dead)
            embed[dead] = fresh
            self.embed_sum[dead] = fresh
            self.cluster_size[dead] = 1.0

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch_images(batch)
        tok = self.tokenizer
        c = x.shape[1]
        z = tok.encoder(map_pixels(x)).float()  # (B, D, h, w)
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        if self.training and not bool(self.initialized):
            self.update_codebook(flat.detach(), torch.zeros(0, dtype=torch.long, device=z.device))
        ids = tok.codebook.neg_distances(flat.detach()).argmax(1)  # type: ignore[union-attr]  # (B*h*w,)
        z_q = tok.codebook.embed[ids].reshape(b, h, w, d).permute(0, 3, 1, 2)  # type: ignore[union-attr]
        commit = F.mse_loss(z, z_q.detach())
        z_st = z + (z_q - z).detach()  # straight-through: decoder gradients flow into the encoder
        stats = tok.decoder(z_st)  # (B, 2C, H, W)
        recon = recon_loss(stats, x, self.cfg)
        loss = recon + self.cfg.commitment * commit
        self.defer_codebook_update(flat.detach(), ids)  # applied after the optimiser step
        with torch.no_grad():
            metrics = {
                "recon": float(recon),
                "commit": float(commit),
                "psnr": float(psnr(stats_to_images(stats, c), x).mean()),
                "perplexity": code_perplexity(ids, tok.vocab_size),
            }
        return loss, metrics


__all__ = ["VQObjective"]
