"""Classification metrics shared by fine-tuning and the probes (segmentation's are in :mod:`.segment_eval`)."""

from __future__ import annotations

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> list[int]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at the classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (B, kmax)
    hit = top == labels.view(-1, 1)  # (B, kmax)
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]
