"""scripts/gpu_check.sh --dry-run: the GPU check's code path on CPU (CUDA-only steps skipped), in CI."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.helpers.paths import ROOT

CUDA_ONLY = {"pytest_cuda", "pretrain_beit_fp16", "pretrain_mae_fp16", "pretrain_ibot_fp16"}


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--dry-run", "--budget-s", "1200",
                           "--work", str(tmp_path / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    doc = json.loads(out.read_text())
    status = {s["name"]: s["status"] for s in doc["steps"]}
    assert proc.returncode == 0, (status, proc.stdout[-3000:])
    assert doc["dry_run"] is True and doc["summary"]["fail"] == 0
    assert {n for n, s in status.items() if s == "skipped"} == CUDA_ONLY
    assert {"tokenizer", "pretrain_beit_bf16", "pretrain_mae_bf16", "pretrain_ibot_bf16", "finetune", "segment",
            "torchrun_1proc", "resume_kill_at_step_3", "resume_after_sigkill", "bench_pretrain_step",
            "bench_tokenizer_encode", "bench_loader"} <= set(status)
    steps = {s["name"]: s for s in doc["steps"]}
    assert steps["torchrun_1proc"]["details"]["backend"] == "gloo"
    assert steps["resume_after_sigkill"]["details"]["max_abs_loss_diff_vs_uninterrupted"] == 0.0  # CPU: exact
    row = steps["bench_pretrain_step"]["details"]["rows"][0]
    assert row["ours_img_s"] > 0 and 0 < row["mfu_vs_matmul"] < 2 and row["gflop_per_image"] > 0
    assert row["mfu"] is None  # no datasheet peak on a CPU
    tok = steps["bench_tokenizer_encode"]["details"]
    assert tok["step"]["overlap_same_loss"] and tok["rows"][0]["images_per_s"]["fp32"] > 0
    loader = steps["bench_loader"]["details"]["images_per_s_per_core"]
    assert loader["peer"] > 0 and set(loader) >= {"beit_folder", "beit_shards", "beit_shards_u8_fast"}
    assert "isa" in doc["environment"]["machine"]
    kernels = {r["kernel"] for r in steps["attention_kernels"]["details"]["accuracy"] if "error" not in r}
    assert {"sdpa", "explicit"} <= kernels  # the CPU kernels ran and were compared with float64


def test_gpu_check_only_runs_the_selected_steps(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--dry-run", "--only", "attention",
                           "--work", str(tmp_path / "work")],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    doc = json.loads(out.read_text())
    status = {s["name"]: s["status"] for s in doc["steps"]}
    assert proc.returncode == 0, (status, proc.stdout[-3000:])
    assert status.pop("attention_kernels") == "pass"
    assert status.pop("environment") == status.pop("data") == "pass"
    assert set(status.values()) == {"skipped"} and "tokenizer" in status
    assert {s["details"]["why"] for s in doc["steps"] if s["status"] == "skipped"} == {"not selected (--only)"}
