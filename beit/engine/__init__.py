"""THE training engine: one lifecycle for everything that trains, around one training loop.

- :mod:`.lifecycle`: :func:`run` (start -> build -> claim the folder once -> train -> save -> outputs) and the
  contract a kind of training fills in, :class:`TrainingTask` -> :class:`Training`;
- :mod:`.loop`: :func:`train` and its :class:`Trainer` (the algorithm, step by named step);
- :mod:`.state`: :class:`RunState`, :class:`TrainResult`, :func:`resolve_steps`, :class:`TrainingError`;
- :mod:`.folder`: the run folder as the engine uses it (claim, the checkpoint to resume from);
- :mod:`.batches`: the seeded data order (exact resume, DDP equal to one process);
- :mod:`.distributed`: torchrun and seeds; :mod:`.signals`: SIGTERM / Ctrl-C; :mod:`.metrics`: ``metrics.jsonl``.
"""

from .batches import SeededDataset, StepBatchSampler, batch_size_of, sample_seed, to_device
from .distributed import DistEnv, seed_everything, setup_distributed
from .lifecycle import Training, TrainingTask, finish_run, run, start_run
from .loop import Trainer, autocast_context, method_state, train, unwrap
from .metrics import MetricsWriter
from .signals import take_stop_signal
from .state import RunState, TrainingError, TrainResult, resolve_steps

__all__ = [
    "DistEnv",
    "MetricsWriter",
    "RunState",
    "SeededDataset",
    "StepBatchSampler",
    "TrainResult",
    "Trainer",
    "Training",
    "TrainingError",
    "TrainingTask",
    "autocast_context",
    "batch_size_of",
    "finish_run",
    "method_state",
    "resolve_steps",
    "run",
    "sample_seed",
    "seed_everything",
    "setup_distributed",
    "start_run",
    "take_stop_signal",
    "to_device",
    "train",
    "unwrap",
]
