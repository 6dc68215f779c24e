"""`beit pretrain` end to end on a tiny folder: outputs, call contract of beit.load, exact resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import beit
from beit.cli import main
from beit.models.tokenizer import Tokenizer, save_tokenizer
from beit.models.tokenizer import TokenizerConfig as DVAEConfig
from tests.helpers.paths import ROOT

TINY = ["model.depth=2", "model.embed_dim=32", "model.num_heads=2", "train.num_workers=0", "train.log_every=1",
        "beit.min_block=4"]


@pytest.fixture
def tiny_tokenizer(tmp_path) -> Path:
    torch.manual_seed(0)
    tok = Tokenizer(DVAEConfig(img_size=16, vocab_size=32, n_hid=16, n_groups=2, n_init=16))
    return save_tokenizer(tok, tmp_path / "tok").parent


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_pretrain_writes_run_and_loads(tmp_path, make_image_folder, tiny_tokenizer):
    data = make_image_folder(per_class=8)
    run = tmp_path / "run"
    code = main(["pretrain", "--data", str(data), "--tokenizer", str(tiny_tokenizer), "--out", str(run),
                 "--steps", "4", "--batch-size", "4", "--precision", "fp32", *TINY])
    assert code == 0
    r = rows(run)
    assert [x["step"] for x in r] == [1, 2, 3, 4]
    assert all({"loss", "lr", "mlm_acc"} <= set(x) for x in r)
    assert (run / "loss.png").stat().st_size > 0 and (run / "masks.png").stat().st_size > 0
    assert "vocab_size: 32" in (run / "config.yaml").read_text()
    model = beit.load(run)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, :5] = True
    mask[1, 10:13] = True
    out = model(torch.randn(2, 3, 32, 32), mask)
    assert out.shape == (8, 32)  # (num_masked, vocab)


def test_pretrain_resume_after_sigkill_is_exact(tmp_path, make_image_folder, tiny_tokenizer):
    data = make_image_folder(per_class=8)
    args = ["pretrain", "--data", str(data), "--tokenizer", str(tiny_tokenizer), "--steps", "8",
            "--batch-size", "4", "--precision", "fp32", "train.ckpt_every=3", *TINY]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    drv = [sys.executable, "-m", "tests.helpers.kill_driver"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run([*drv, "0", *args, "--out", str(full)], env=env, check=True, capture_output=True, timeout=300)
    p = subprocess.run([*drv, "5", *args, "--out", str(cut)], env=env, capture_output=True, timeout=300)
    assert p.returncode == -signal.SIGKILL
    subprocess.run([*drv, "0", *args, "--out", str(cut), "--resume"], env=env, check=True, capture_output=True,
                   timeout=300)
    a = {x["step"]: x["loss"] for x in rows(full)}
    b = {x["step"]: x["loss"] for x in rows(cut)}
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert a == b


def test_pretrain_user_errors_are_one_line(tmp_path, make_image_folder, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["pretrain", "--data", str(empty), "--out", str(tmp_path / "r"), "beit.target=pixels"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("beit: error:") and "no images" in err and "\n" not in err
    data = make_image_folder()
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "r"), "optim.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "r"), "train.steps=abc"]) == 2
    assert "train.steps: expected an integer" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "r")]) == 2
    assert "--tokenizer" in capsys.readouterr().err
