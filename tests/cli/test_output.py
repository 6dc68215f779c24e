"""Every command ends with a short human summary (numbers with their baselines, where the files are, the next
command) or, with ``--json``, exactly one JSON line; ``run.json`` records each session that trained into a run
(command line, beit and torch versions, git commit from a checkout, machine)."""

from __future__ import annotations

import json

import beit
from beit.cli import main
from beit.runs import RunDir, git_commit

TINY = ["--batch-size", "6", "--workers", "0", "--device", "cpu", "model.img_size=16", "model.depth=1",
        "model.embed_dim=16", "model.num_heads=2"]


def test_finetune_summary_json_and_sessions(tmp_path, make_image_folder, capsys):
    make_image_folder(tmp_path / "data" / "train", per_class=4, size=16, seed=0)
    make_image_folder(tmp_path / "data" / "val", per_class=2, size=16, seed=1)
    run = tmp_path / "ft"
    base = ["-q", "finetune", "--data", str(tmp_path / "data"), "--init", "none", "--out", str(run), *TINY]
    assert main([*base, "--steps", "2"]) == 0
    human = capsys.readouterr().out
    classes = len((run / "classes.txt").read_text().split())
    assert human.startswith(f"finetune: done at step 2 -> {run}")
    assert "val top-1 (best)" in human and "chance (1 / classes)" in human and f"{100 / classes:.2f} % ({classes} classes)" in human
    assert str(run / "checkpoints" / "best") in human and f"next: beit export {run}" in human
    assert "{" not in human  # no JSON mixed in

    assert main([*base, "--steps", "4", "--resume", "--json"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1
    res = json.loads(out)
    assert res["step"] == 4 and res["status"] == "done" and "train_acc" in res and "acc" not in res
    evals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "val_top1" in ln]
    first_best = next(r for r in evals if r["val_top1"] == max(e["val_top1"] for e in evals))
    assert res["best"]["step"] == first_best["step"]  # kept across the resume, whichever session found it
    assert res["last_eval"]["top1"] == evals[-1]["val_top1"]
    assert "top5" not in res["last_eval"]  # 2 classes

    sessions = RunDir(run).manifest()["sessions"]
    assert len(sessions) == 2  # the first run and its resume
    for s in sessions:
        assert s["beit"] == beit.__version__ and s["torch"] and s["command"] and s["machine"]
        assert s["git"] == git_commit()  # this test runs from a checkout: the commit (None when installed)


def test_tokenizer_train_summary(tmp_path, make_image_folder, capsys):
    data = make_image_folder(tmp_path / "imgs", classes=(), per_class=12, size=16)
    val = make_image_folder(tmp_path / "val", classes=(), per_class=4, size=16, seed=3)
    run = tmp_path / "tok"
    assert main(["-q", "tokenizer", "train", "--data", str(data), "--val-data", str(val), "--out", str(run),
                 "--steps", "2", "--batch-size", "4", "--workers", "0", "--device", "cpu", "model.img_size=16",
                 "train.log_every=1"]) == 0
    human = capsys.readouterr().out
    assert human.startswith(f"tokenizer: done at step 2 -> {run}")
    assert "16 px -> 4x4 tokens, vocabulary 512" in human and "held-out psnr" in human
    assert str(run / "tokenizer.safetensors") in human
    assert f"--tokenizer {run} --out runs/pretrain" in human


def test_probe_summary_names_the_choice_and_its_baselines(tmp_path, make_image_folder, capsys):
    make_image_folder(tmp_path / "data" / "train", per_class=5, size=8, seed=0)
    make_image_folder(tmp_path / "data" / "val", per_class=2, size=8, seed=1)
    assert main(["-q", "probe", "knn", "--data", str(tmp_path / "data"), "--init", "pixels", "--workers", "0",
                 "--device", "cpu", "--out", str(tmp_path / "p.json")]) == 0
    human = capsys.readouterr().out
    res = json.loads((tmp_path / "p.json").read_text())
    assert human.startswith(f"probe knn of pixels: {res['num_train']} training / {res['num_val']} validation")
    assert f"val top-1 {res['best']['top1']:.2f} %" in human and "chance (1 / classes)" in human
    assert "top-5" not in human  # 2 classes
    assert str(tmp_path / "p.json") in human and "next: beit finetune" in human
