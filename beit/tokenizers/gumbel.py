"""The Gumbel-softmax dVAE objective (``model.quantizer=gumbel``).

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
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..models.tokenizer import Tokenizer, stats_to_images
from .base import ObjectiveConfig, TokenizerObjective, batch_images, code_perplexity, psnr, recon_loss

__all__ = ["GumbelObjective"]


class GumbelObjective(TokenizerObjective):
    """Gumbel-softmax dVAE: ``forward(images in [0, 1]) -> (loss, metrics)``."""

    def __init__(self, tokenizer: Tokenizer, cfg: ObjectiveConfig | None = None) -> None:
        if tokenizer.cfg.quantizer != "gumbel":
            raise ConfigError("GumbelObjective trains model.quantizer=gumbel tokenizers; use VQObjective for vq")
        super().__init__(tokenizer, cfg or ObjectiveConfig())

    @property
    def tau(self) -> float:
        c = self.cfg
        t = self.progress(c.tau_anneal_fraction)
        if c.tau_schedule == "exp":
            return c.tau_start * (c.tau_end / c.tau_start) ** t
        return c.tau_end + (c.tau_start - c.tau_end) * 0.5 * (1 + math.cos(math.pi * t))

    @property
    def kl_weight(self) -> float:
        return self.cfg.kl_weight * self.progress(self.cfg.kl_warmup_fraction)

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
