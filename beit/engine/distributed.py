"""torchrun: the process group this process joins (rank, world, device), and the seeds of every RNG."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("beit")


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

