"""Experiment trackers: the run's metrics, config, machine and pictures also sent to TensorBoard, W&B or MLflow.

``metrics.jsonl`` stays the run's own record; a tracker is a copy for the tools a team already uses, chosen with
``--log NAME`` (repeatable) or ``train.log: [NAME, ...]`` (``train.tensorboard: true`` is the same as
``--log tensorboard``). Rank 0 writes; nothing here needs a network:

* ``tensorboard``: event files in ``RUN/tensorboard`` (``tensorboard --logdir RUN``).
* ``wandb``: offline run in ``RUN/wandb`` unless ``WANDB_MODE`` says otherwise (``wandb sync RUN/wandb/offline-run-*``
  uploads it later); project ``WANDB_PROJECT`` or ``beit``.
* ``mlflow``: the file store ``RUN/mlruns`` unless ``MLFLOW_TRACKING_URI`` names another store; experiment
  ``MLFLOW_EXPERIMENT_NAME`` or ``beit``.

Each gets the resolved config and the machine description as hyperparameters, every logged row of metrics at its
step, and the pictures the run draws at its end (curves, reconstructions, predictions). A resumed run continues the
same W&B / MLflow run (their ids are kept in ``RUN/trackers.json``). The packages are optional
(``pip install 'beit[track]'``) and imported only when asked for.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .config import TRACKERS, ConfigError, flatten

__all__ = ["IDS_FILE", "TRACKERS", "Trackers", "TrackingError", "check_installed", "wanted"]

log = logging.getLogger("beit")

IDS_FILE = "trackers.json"  # tracker -> the id of its run, so that --resume continues it
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class TrackingError(ConfigError):
    """A tracker asked for but not installed (or refusing to start): the message says what to install."""


def wanted(train_cfg: Any) -> list[str]:
    """The trackers a training config asks for: ``train.log`` plus ``tensorboard`` for ``train.tensorboard``."""
    return list(dict.fromkeys([*train_cfg.log, *(["tensorboard"] if train_cfg.tensorboard else [])]))


def check_installed(names: list[str]) -> None:
    """Raise :class:`TrackingError` (one line, naming the extra) for an asked tracker whose package is missing,
    before the run starts rather than after its first steps."""
    missing = [n for n in names if importlib.util.find_spec(_PACKAGES[n]) is None]
    if missing:
        raise TrackingError(f"--log {missing[0]} needs the {_PACKAGES[missing[0]]} package: "
                            "pip install 'beit[track]'")


def _scalars(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict, machine: dict, ids: dict) -> None:  # noqa: ARG002
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(run_dir / "tensorboard"))
        # TensorBoard has no flat hyperparameter table without a metric to pair them with: text it shows as-is
        self.w.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flatten(config).items()))
        self.w.add_text("machine", "\n".join(f"    {k}: {v}" for k, v in machine.items()))

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.w.add_scalar(k, v, step)

    def image(self, name: str, path: Path, step: int) -> None:
        self.w.add_image(name, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self, failed: bool) -> None:  # noqa: ARG002
        self.w.close()


class _WandB:
    def __init__(self, run_dir: Path, config: dict, machine: dict, ids: dict) -> None:
        import wandb

        # console="off": metrics.jsonl already has every number, and the progress bar's redraws would fill the log
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "beit"), name=run_dir.name, dir=str(run_dir),
                              mode=os.environ.get("WANDB_MODE", "offline"), id=ids.get("wandb"),
                              resume="allow" if ids.get("wandb") else None,
                              config={"config": config, "machine": machine},
                              settings=wandb.Settings(console="off", silent=True))
        ids["wandb"] = self.run.id

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, name: str, path: Path, step: int) -> None:
        import wandb

        self.run.log({name: wandb.Image(str(path))}, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class _MLflow:
    def __init__(self, run_dir: Path, config: dict, machine: dict, ids: dict) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store but refuses it unless told so; a folder next to the run needs no server
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        prev = ids.get("mlflow") or {}
        if prev.get("uri") == uri:
            self.run_id = prev["run_id"]  # resumed: the same run, its parameters already logged
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "beit")
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
            params = {**{f"config.{k}": v for k, v in flatten(config).items()},
                      **{f"machine.{k}": v for k, v in machine.items()}}
            # a parameter value holds at most 6000 characters (MLflow's limit)
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        ids["mlflow"] = {"uri": uri, "run_id": self.run_id}

    def metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def image(self, name: str, path: Path, step: int) -> None:  # noqa: ARG002
        self.client.log_artifact(self.run_id, str(path), artifact_path="images")

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


class Trackers:
    """The trackers of one run (rank 0). A tracker that fails while logging is warned about and dropped: the
    run and its ``metrics.jsonl`` never stop for a copy."""

    def __init__(self, run_dir: str | Path, names: list[str], *, config: dict, machine: dict) -> None:
        check_installed(names)
        self.run_dir = Path(run_dir)
        ids_path = self.run_dir / IDS_FILE
        try:
            ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            ids = {}
        self.backends: dict[str, Any] = {}
        for name in names:
            try:
                self.backends[name] = _BACKENDS[name](self.run_dir, config, machine, ids)
            except Exception as e:  # noqa: BLE001 - a tracker's own error (its config, its store): the run goes on
                log.warning("--log %s: could not start (%s); logging without it", name, str(e).splitlines()[0])
        if ids:
            ids_path.write_text(json.dumps(ids, indent=2) + "\n")
        self.closed = False
        atexit.register(self.close, True)  # a caller that never reaches finish_run still ends its runs

    def _each(self, what: str, *args: Any) -> None:
        for name, backend in list(self.backends.items()):
            try:
                getattr(backend, what)(*args)
            except Exception as e:  # noqa: BLE001 - see the class docstring
                log.warning("--log %s: %s failed (%s); dropped", name, what, str(e).splitlines()[0])
                self.backends.pop(name)

    def log_metrics(self, row: dict) -> None:
        values = _scalars(row)
        if values and not self.closed:
            self._each("metrics", int(row["step"]), values)

    def log_image(self, name: str, path: str | Path, step: int) -> None:
        if not self.closed and Path(path).is_file():
            self._each("image", name, Path(path), step)

    def close(self, failed: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self._each("close", failed)
        atexit.unregister(self.close)
