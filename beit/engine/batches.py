"""The data order of a run: every sample transformed under a seed of its own and every step's batch drawn from a
seeded permutation, so a resumed run replays exactly the batches it would have seen and DDP equals one process;
batches onto the device; loader workers that leave signals to the main process."""

from __future__ import annotations

import hashlib
import random
import signal
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset

from ..data.folder import unwrap_worker_error
from ..runs import release_in_child


def sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class SeededDataset(Dataset):
    """Indexes ``(epoch, i)``: sample ``i`` is transformed under RNG seeded by (seed, epoch, i).

    Augmentations and masks then depend only on *which* sample is drawn, never on the worker or on how
    many samples came before, which is what makes resume exact and DDP equal to one process.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also seeds every accelerator backend, and while CUDA is
            # not initialised each of those calls records a Python stack trace (~0.1 ms per sample, a sixth of
            # a tiny preset's step); the transforms draw from the CPU generator alone
            torch.default_generator.manual_seed(s)
            random.seed(s)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)


class StepBatchSampler:
    """Yields the micro-batches of this rank from optimiser step ``start`` up to ``total``.

    Epoch ``e`` is a permutation seeded by (seed, e); optimiser step ``s`` of an epoch takes the global
    batch ``perm[s*B:(s+1)*B]``; rank ``r`` takes its contiguous share, split into ``accum`` micro-batches.
    """

    def __init__(self, n: int, global_batch: int, seed: int, start: int, total: int, rank: int, world: int,
                 accum: int, shuffle: bool = True):
        self.n, self.B, self.seed = n, global_batch, seed
        self.start, self.total, self.rank, self.world, self.accum = start, total, rank, world, accum
        self.shuffle = shuffle
        self.steps_per_epoch = n // global_batch
        self.per_rank = global_batch // world
        self.micro = self.per_rank // accum

    def __len__(self) -> int:
        return (self.total - self.start) * self.accum

    def _perm(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cached: tuple[int, torch.Tensor] | None = None
        for step in range(self.start, self.total):
            epoch, s = divmod(step, self.steps_per_epoch)
            if cached is None or cached[0] != epoch:
                cached = (epoch, self._perm(epoch))
            glob = cached[1][s * self.B:(s + 1) * self.B]
            mine = glob[self.rank * self.per_rank:(self.rank + 1) * self.per_rank].tolist()
            for a in range(self.accum):
                yield [(epoch, i) for i in mine[a * self.micro:(a + 1) * self.micro]]


def to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    if torch.is_tensor(batch):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch_size_of(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return batch_size_of(batch[0])
    return 1


def shutdown_loader(batches: Any) -> None:
    """Stop a DataLoader iterator's worker processes now (no-op for anything else, or workers already gone).
    :func:`train` calls it when a run ends instead of trusting garbage collection: the workers ignore SIGTERM
    (:func:`ignore_stop_signals`), and multiprocessing's exit handler stops leftover workers with SIGTERM and
    then waits for them, so an iterator still alive at exit hung the process (two CamVid runs, 2026-11-27)."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()


def ignore_stop_signals(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """Loader workers leave SIGTERM / Ctrl-C to the main process, which saves and then shuts them down: a
    signal sent to the whole process group (Ctrl-C in a terminal, ``timeout``, a batch scheduler) must not kill
    a worker first and turn a clean stop into a "worker exited unexpectedly" error. The worker also closes its
    copy of the run lock's descriptor, so the lock dies with the main process (a kill -9 leaves workers
    running for a few seconds, and ``--resume`` right after was refused while they held it)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    release_in_child()

def next_batch(batches: Iterator) -> Any:
    """``next(batches)``; an error raised in a DataLoader worker comes back as the worker's own one-line
    error (PyTorch wraps it in a message holding the worker's whole traceback)."""
    try:
        return next(batches)
    except StopIteration:
        raise
    except Exception as e:
        raise unwrap_worker_error(e) from None

