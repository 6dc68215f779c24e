"""bench/tiny_throughput.py runs (``--dry-run``: a tiny model, one step) and reports every field the notebook
quotes: images/s, GFLOP/s and its fraction of the matmul rate, the peer's images/s and our ratio to it."""

from __future__ import annotations

import pytest

from bench import tiny_throughput as tt


def test_dry_run_prints_throughput_flops_and_the_peer(capsys):
    pytest.importorskip("transformers")
    rows = tt.main(["--dry-run", "--threads", "1", "--models", "demo_mae,beit_tiny", "--dtype", "fp32,bf16",
                    "--variants", "engine,loop"])
    out = capsys.readouterr().out
    assert out.startswith("machine: ") and "matmul rate (fp32" in out and "matmul rate (bf16" in out
    assert out.count("| demo_mae |") == 4 and out.count("| beit_tiny |") == 4
    assert {(r["model"], r["precision"], r["variant"]) for r in rows} == {
        (m, d, v) for m in ("demo_mae", "beit_tiny") for d in ("fp32", "bf16") for v in ("engine", "loop")}
    for r in rows:
        assert r["img_s"] > 0 and r["gflop_per_step"] > 0 and 0 < r["of_matmul_rate"]
        assert r["peer_img_s"] > 0 and r["ours_over_peer"] > 0
    assert rows[0]["batch"] == 4  # the dry run's batch, not the preset's


def test_dry_run_profile_splits_the_step_into_phases(capsys):
    (prof,) = tt.main(["--dry-run", "--profile", "--threads", "1", "--models", "mae_tiny", "--dtype", "fp32"])
    assert set(prof["phases_ms"]) == {"forward", "backward", "read loss and metrics",
                                      "optimizer (clip, AdamW, zero_grad)"}
    assert prof["aten_calls_per_step"] > prof["aten_calls_per_step_top_level"] > 10
    assert "masking (random_masking)" in prof["pieces_ms"] and prof["dispatch_floor_ms"] > 0


def test_models_are_the_demos_mae_and_the_tiny_presets():
    from beit.demo.plan import DEMO_ARCH, DEMO_PRETRAIN

    assert tt.MODELS["demo_mae"][1] == [*DEMO_ARCH, *DEMO_PRETRAIN["mae"]]
    setup = tt.build_setup("demo_mae")
    assert (setup.cfg.model.embed_dim, setup.cfg.model.depth, setup.cfg.train.batch_size) == (96, 4, 32)
    assert setup.cfg.mae.decoder_depth == 1
    assert tt.build_setup("beit_tiny").cfg.train.batch_size == 64
