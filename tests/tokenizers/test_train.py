"""Tokenizer objectives (dVAE Gumbel and VQ-EMA), their schedules, and training through the real engine."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from beit.config import ConfigError, replace
from beit.loading import load_tokenizer
from beit.models.tokenizer import Tokenizer, map_pixels
from beit.models.tokenizer import TokenizerConfig as DVAEConfig
from beit.tokenizers import (
    GumbelObjective as DVAEObjective,
)
from beit.tokenizers import (
    ObjectiveConfig,
    VQObjective,
    build_config,
    build_objective,
    evaluate_cmd,
    evaluate_tokenizer,
    reconstruction_grid,
    train_tokenizer,
)
from beit.tokenizers.base import code_perplexity, logit_laplace_nll, psnr

# 16px images -> 4x4 tokens of 4x4 pixels: the smallest model that still has to learn something
TINY = DVAEConfig(img_size=16, vocab_size=64, n_hid=16, n_groups=3, n_blk_per_group=1, n_init=32)


def test_logit_laplace_nll_matches_density():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 4)
    stats = torch.randn(2, 6, 4, 4)
    mu, log_b = stats[:, :3], stats[:, 3:]
    y = map_pixels(x)
    # change of variables: y = sigmoid(u), u ~ Laplace(mu, b)  =>  p(y) = Laplace(logit y) / (y (1 - y))
    ref = -(torch.distributions.Laplace(mu, log_b.exp()).log_prob(torch.logit(y)) - torch.log(y * (1 - y)))
    torch.testing.assert_close(logit_laplace_nll(stats, x), ref.mean())


def test_psnr_and_perplexity():
    x = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(psnr(x + 0.1, x), torch.tensor([20.0, 20.0]))
    assert code_perplexity(torch.tensor([3, 3, 3]), 8) == pytest.approx(1.0)
    assert code_perplexity(torch.arange(8), 8) == pytest.approx(8.0)


def test_schedules_and_resume_state():
    m = DVAEObjective(Tokenizer(TINY), ObjectiveConfig(tau_anneal_fraction=0.5, kl_warmup_fraction=0.1,
                                                       kl_weight=2.0))
    assert m.tau == pytest.approx(1.0) and m.kl_weight == 0.0
    m.after_step(5, 100)
    assert m.kl_weight == pytest.approx(1.0)
    m.after_step(25, 100)
    assert m.tau == pytest.approx((1 + 1 / 16) / 2)  # cosine midpoint
    m.after_step(60, 100)
    assert m.tau == pytest.approx(1 / 16) and m.kl_weight == pytest.approx(2.0)
    exp = DVAEObjective(Tokenizer(TINY), ObjectiveConfig(tau_schedule="exp", tau_anneal_fraction=1.0))
    exp.after_step(50, 100)
    assert exp.tau == pytest.approx(0.25)  # geometric midpoint of 1 and 1/16
    # the schedule position is a buffer: a resumed run continues where it stopped
    fresh = DVAEObjective(Tokenizer(TINY), m.cfg)
    fresh.load_state_dict(m.state_dict())
    assert fresh.tau == m.tau and fresh.kl_weight == m.kl_weight


def test_objective_config_and_quantizer_checks():
    with pytest.raises(ConfigError, match="recon"):
        ObjectiveConfig(recon="l1")
    with pytest.raises(ConfigError, match="vq"):
        DVAEObjective(Tokenizer(replace(TINY, quantizer="vq")))
    with pytest.raises(ConfigError, match="vq"):
        VQObjective(Tokenizer(TINY))
    assert isinstance(build_objective(Tokenizer(replace(TINY, quantizer="vq"))), VQObjective)
    with pytest.raises(ConfigError, match="unknown config key"):
        build_config("dvae_32", overrides=["objective.kl_wieght=1"])
    cfg = build_config("vq_32", overrides=["model.vocab_size=1024", "train.steps=7"])
    assert cfg.model.quantizer == "vq" and cfg.model.vocab_size == 1024 and cfg.train.steps == 7


@pytest.mark.parametrize("quantizer", ["gumbel", "vq"])
def test_objective_forward_backward(synthetic_images, quantizer):
    torch.manual_seed(0)
    m = build_objective(Tokenizer(replace(TINY, quantizer=quantizer, embed_dim=8)))
    x = synthetic_images(4, size=16)
    loss, metrics = m((x, torch.zeros(4)))  # (images, labels) batches are accepted
    loss.backward()
    assert math.isfinite(float(loss.detach()))
    assert {"recon", "psnr", "perplexity"} <= set(metrics)
    assert all(p.grad is not None for p in m.tokenizer.encoder.parameters())
    assert all(p.grad is not None for p in m.tokenizer.decoder.parameters())
    if quantizer == "gumbel":
        assert {"kl", "tau", "kl_weight"} <= set(metrics)
    loss_mse, _ = build_objective(Tokenizer(TINY), ObjectiveConfig(recon="mse"))(x)
    assert 0 < float(loss_mse.detach()) < 1


def test_vq_ema_and_dead_code_restart():
    torch.manual_seed(0)
    tok = Tokenizer(replace(TINY, quantizer="vq", embed_dim=4, vocab_size=8))
    m = VQObjective(tok, ObjectiveConfig(ema_decay=0.5, dead_code_threshold=0.5))
    flat = torch.randn(64, 4)
    m.update_codebook(flat, torch.zeros(0, dtype=torch.long))  # first call: codebook from data
    assert bool(m.initialized)
    assert all(any(torch.equal(e, f) for f in flat) for e in tok.codebook.embed)
    # all vectors go to code 0: it moves to their mean, the unused codes decay and get restarted
    ids = torch.zeros(64, dtype=torch.long)
    m.update_codebook(flat, ids)  # unused codes have no EMA mass yet: restarted at once, count 1
    assert m.cluster_size[0] == 32 and (m.cluster_size[1:] == 1.0).all()
    m.update_codebook(flat, ids)  # unused counts 1 -> 0.5: not below the threshold
    assert (m.cluster_size[1:] == 0.5).all()
    m.update_codebook(flat, ids)  # 0.5 -> 0.25 < 0.5: restarted again
    assert m.cluster_size[0] > 50
    assert torch.allclose(tok.codebook.embed[0], flat.mean(0), atol=0.2)
    restarted = (m.cluster_size == 1.0).nonzero().flatten().tolist()
    assert restarted  # dead codes came back at data points
    for k in restarted:
        assert any(torch.equal(tok.codebook.embed[k], f) for f in flat)


def _constant_psnr(images: torch.Tensor) -> float:
    mean = images.mean(0, keepdim=True).expand_as(images)
    return float(psnr(mean, images).mean())


@pytest.mark.parametrize("quantizer,steps,lr", [("gumbel", 300, 1e-2), ("vq", 200, 3e-3)])
def test_train_tokenizer_end_to_end(make_image_folder, tmp_path, quantizer, steps, lr):
    """A few hundred steps through beit.engine.train: decode(encode(x)) must carry the image, well beyond a
    constant guess and an untrained tokenizer (measured: gumbel ~17 dB, vq ~15 dB, constant ~10 dB)."""
    data = make_image_folder(classes=("a", "b"), per_class=16, size=16, seed=1)
    run = train_tokenizer(
        data, tmp_path / "run", preset=None, steps=steps, val_dir=data,
        overrides={
            "model": {**TINY.__dict__, "quantizer": quantizer, "embed_dim": 16},
            "train.batch_size": 16, "train.num_workers": 0, "train.log_every": 25, "train.ckpt_every": 1000,
            "train.eval_every": 1000, "train.device": "cpu", "optim.lr": lr, "optim.warmup_steps": 10,
            "data.hflip": False,
        },
    )
    for name in ("tokenizer.safetensors", "config.yaml", "metrics.jsonl", "reconstructions.png", "eval.json"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[-1]["step"] == steps and train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert {"recon", "psnr", "perplexity"} <= set(train_rows[-1])
    if quantizer == "gumbel":
        assert train_rows[-1]["tau"] == pytest.approx(1 / 16, rel=0.05)

    tok = load_tokenizer(run)
    images = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1)
                          for p in sorted(data.rglob("*.png"))]).float() / 255
    trained = evaluate_tokenizer(tok, images)
    untrained = evaluate_tokenizer(Tokenizer(tok.cfg), images)
    baseline = _constant_psnr(images)
    assert trained["num_images"] == 32
    assert trained["psnr"] > baseline + 3, (trained, baseline)
    assert trained["psnr"] > untrained["psnr"] + 3, (trained, untrained)
    assert trained["codebook_usage"] > 0.1
    saved = json.loads((run / "eval.json").read_text())
    assert saved["psnr"] == pytest.approx(trained["psnr"], abs=0.05)  # same numbers from files as in memory

    res = evaluate_cmd(run, data, grid=tmp_path / "grid.png", out_json=tmp_path / "e.json")
    assert res["psnr"] == pytest.approx(trained["psnr"], abs=0.05)
    assert json.loads((tmp_path / "e.json").read_text())["num_images"] == 32
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (2 + 8 * (16 + 2), 2 + 2 * (16 + 2))  # 8 originals above 8 reconstructions


def test_reconstruction_grid(tmp_path, synthetic_images):
    tok = Tokenizer(TINY)
    path = reconstruction_grid(tok, synthetic_images(3, size=16), tmp_path / "sub" / "g.png")
    assert Image.open(path).size == (2 + 3 * 18, 2 + 2 * 18)


def test_one_entry_picks_the_objective_from_the_config(tmp_path, monkeypatch):
    """``train_tokenizer`` (``beit tokenizer train``, ``beit.train_tokenizer``) is the one entry of every objective:
    ``objective`` / a ``vqkd_*`` preset choose the run config and its lifecycle task; a teacher only fits VQ-KD."""
    from beit import engine
    from beit.tokenizers.train import PixelTokenizerTraining
    from beit.tokenizers.vqkd_train import VQKDTrainConfig, VQKDTraining

    assert build_config(None, None, None, objective="vq").model.quantizer == "vq"
    assert build_config("dvae_32", None, {"train.steps": 3}, objective="vq").model.quantizer == "vq"
    assert build_config("dvae_32").model.quantizer == "gumbel"
    vqkd = build_config("vqkd_32", None, ["vqkd.teacher_block=1"], teacher="runs/mae")
    assert isinstance(vqkd, VQKDTrainConfig) and (vqkd.vqkd.teacher, vqkd.vqkd.teacher_block) == ("runs/mae", 1)
    assert isinstance(build_config(None, None, None, objective="vqkd"), VQKDTrainConfig)
    with pytest.raises(ConfigError, match="not a VQ-KD preset"):
        build_config("dvae_32", objective="vqkd")
    with pytest.raises(ConfigError, match="teacher is for the vqkd objective"):
        build_config("vq_32", teacher="runs/mae")
    with pytest.raises(ConfigError, match="unknown tokenizer objective"):
        build_config(objective="pixels")

    ran = []  # which lifecycle task each config runs (the engine itself is tested elsewhere)
    monkeypatch.setattr(engine, "run", lambda task, cfg, out, **k: ran.append((type(task), cfg)) or
                        engine.TrainResult(run_dir=out, step=0, status="done"))
    train_tokenizer(tmp_path / "images", tmp_path / "a", preset="vq_32")
    train_tokenizer(tmp_path / "images", tmp_path / "b", preset="vqkd_32", teacher="runs/mae", steps=7)
    assert [t for t, _ in ran] == [PixelTokenizerTraining, VQKDTraining]
    assert ran[1][1].vqkd.teacher == "runs/mae" and ran[1][1].train.steps == 7
    assert ran[1][1].data.path == str(tmp_path / "images")
