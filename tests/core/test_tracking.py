"""``--log tensorboard|wandb|mlflow``: a run also goes to the trackers, offline, and each tracker's own reader
opens it: MLflow's client on the run's file store, ``wandb leet inspect --json`` on the offline ``.wandb`` file
(``wandb.Api`` is online only), TensorBoard's event reader. Config and machine arrive as hyperparameters, the
metrics at their steps, the run's pictures as images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from beit.cli import main

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

TINY = ["--steps", "4", "--batch-size", "6", "--workers", "0", "--device", "cpu", "model.img_size=16",
        "model.depth=1", "model.embed_dim=16", "model.num_heads=2", "train.log_every=1"]


@pytest.fixture
def finetune_data(tmp_path, make_image_folder):
    make_image_folder(tmp_path / "data" / "train", per_class=4, size=16, seed=0)
    make_image_folder(tmp_path / "data" / "val", per_class=2, size=16, seed=1)
    return tmp_path / "data"


def _wandb_records(run: Path) -> list[dict]:
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    wandb_cli = Path(sys.executable).with_name("wandb")
    cmd = [str(wandb_cli)] if wandb_cli.exists() else [shutil.which("wandb") or "wandb"]
    p = subprocess.run([*cmd, "leet", "inspect", "--json", str(files[0])], capture_output=True, text=True,
                       timeout=120, env={"PATH": "/usr/bin:/bin", "WANDB_SILENT": "true", "HOME": str(run)})
    assert p.returncode == 0, p.stderr
    return [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]


def test_wandb_offline_and_mlflow_file_store_read_back(tmp_path, finetune_data, monkeypatch, capsys):
    for var in ("WANDB_MODE", "MLFLOW_TRACKING_URI", "WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # nothing written outside the test's folder
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    run = tmp_path / "ft"
    rc = main(["-q", "finetune", "--data", str(finetune_data), "--init", "none", "--out", str(run), "--json",
               "--log", "wandb", "--log", "mlflow", "--log", "tensorboard", *TINY])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    val = {r["step"]: r["val_top1"] for r in rows if "val_top1" in r}
    assert sorted(losses) == [1, 2, 3, 4] and val and summary["step"] == 4

    # MLflow: its own client on the file store in the run folder
    from mlflow.tracking import MlflowClient

    ids = json.loads((run / "trackers.json").read_text())
    assert ids["mlflow"]["uri"] == (run / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking_uri=ids["mlflow"]["uri"])
    got = client.get_run(ids["mlflow"]["run_id"])
    assert got.info.status == "FINISHED" and got.info.run_name == "ft"
    params = got.data.params
    assert params["config.train.steps"] == "4" and params["config.model.depth"] == "1"
    assert params["config.train.log"] == str(["wandb", "mlflow", "tensorboard"])
    assert "Xeon" in params["machine.description"] or params["machine.cpu"] in params["machine.description"]
    history = {m.step: m.value for m in client.get_metric_history(got.info.run_id, "loss")}
    assert history == pytest.approx(losses)
    assert {m.step: m.value for m in client.get_metric_history(got.info.run_id, "val_top1")} == pytest.approx(val)
    assert "images/curves.png" in {a.path for a in client.list_artifacts(got.info.run_id, "images")}

    # W&B: offline run in RUN/wandb, read with wandb's own record reader
    records = _wandb_records(run)
    head = next(r["run"] for r in records if r["type"] == "run")
    assert head["run_id"] == ids["wandb"] and head["project"] == "beit"
    config = head["config"]["update"]
    assert config["config"]["train"]["steps"] == 4 and config["machine"]["cpu"] == params["machine.cpu"]
    logged: dict[int, dict] = {}
    for r in records:
        if r["type"] == "history":
            logged.setdefault(int(r["history"]["item"]["_step"]), {}).update(r["history"]["item"])
    assert {s: v["loss"] for s, v in logged.items() if "loss" in v} == pytest.approx(losses)
    assert {s: v["val_top1"] for s, v in logged.items() if "val_top1" in v} == pytest.approx(val)
    images = [v for v in logged.values() if v.get("curves._type") == "image-file"]  # nested keys come flattened
    assert images and images[0]["curves.format"] == "png"
    assert (next((run / "wandb").glob("offline-run-*")) / "files" / images[0]["curves.path"]).is_file()
    assert any(r["type"] == "exit" and r["exit"].get("exit_code", 0) == 0 for r in records)

    # TensorBoard: the event file through tensorboard's reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("loss")} == pytest.approx(losses)
    assert "curves" in acc.Tags()["images"]


def test_tensorboard_switch_is_the_same_tracker(tmp_path, finetune_data, capsys):
    """``train.tensorboard=true`` (the former switch) goes through the same mechanism as ``--log tensorboard``."""
    run = tmp_path / "tb"
    assert main(["-q", "finetune", "--data", str(finetune_data), "--init", "none", "--out", str(run), "--json",
                 *TINY, "train.tensorboard=true"]) == 0
    capsys.readouterr()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_missing_tracker_is_one_line_naming_the_extra(tmp_path, finetune_data, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    rc = main(["-q", "finetune", "--data", str(finetune_data), "--init", "none", "--out", str(tmp_path / "r"),
               "--log", "mlflow", *TINY])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "pip install 'beit[track]'" in err
    assert not (tmp_path / "r").exists()  # refused before the run folder is made


def test_pretraining_sends_its_pictures(tmp_path, make_image_folder, monkeypatch, capsys):
    """With a tracker, an MAE pretraining run also draws attention maps and reconstructions, and the tracker gets
    them with the curves."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = make_image_folder(tmp_path / "imgs", classes=(), per_class=8, size=16)
    run = tmp_path / "mae"
    assert main(["-q", "pretrain", "--json", "--method", "mae", "--data", str(data), "--out", str(run), "--log",
                 "mlflow", "--steps", "2", "--batch-size", "4", "--workers", "0", "--device", "cpu",
                 "model.img_size=16", "model.depth=1", "model.embed_dim=16", "model.num_heads=2"]) == 0
    capsys.readouterr()
    from mlflow.tracking import MlflowClient

    ids = json.loads((run / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=ids["uri"])
    names = {Path(a.path).name for a in client.list_artifacts(ids["run_id"], "images")}
    assert names == {"loss.png", "attention.png", "reconstructions.png"}  # MAE draws its masks inside: no masks.png
    assert (run / "attention.png").is_file() and (run / "reconstructions.png").is_file()
    assert client.get_run(ids["run_id"]).data.params["config.method"] == "mae"
