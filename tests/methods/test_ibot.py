"""iBOT: the loss against the paper's equations written out, EMA teacher, centering, temperature schedule,
local crops, frozen last layer, exact resume after SIGKILL, a falling loss, both backbones loadable."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import beit
from beit import checkpoint as ckpt
from beit.config import ModelConfig
from beit.loading import read_checkpoint
from beit.methods.ibot import IBOTConfig, IBOTMethod, ibot_loss, teacher_temperature
from beit.models.vit import VisionTransformer
from beit.optim import cosine
from tests.helpers import pretrain_driver
from tests.helpers.paths import ROOT
from tests.helpers.pretrain_driver import TINY, pretrain

DRIVER = [sys.executable, "-m", "tests.helpers.pretrain_driver"]


def tiny_ibot(**changes) -> IBOTMethod:
    torch.manual_seed(0)
    mcfg = ModelConfig(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, use_abs_pos_emb=True,
                       use_shared_rel_pos_bias=False, layer_scale_init=0.0, drop_path_rate=0.0)
    cfg = IBOTConfig(**{"out_dim": 12, "hidden_dim": 16, "bottleneck_dim": 8, "local_crop_size": 8, **changes})
    return IBOTMethod.build(mcfg, cfg)


def batch(B: int = 3, local: int = 0, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(B, 2, 4, 4, generator=g) < 0.4
    masks[0, 1] = False  # a crop without masked patches counts as 0, as in the official code
    out = {"global_crops": torch.randn(B, 2, 3, 16, 16, generator=g), "masks": masks}
    if local:
        out["local_crops"] = torch.randn(B, local, 3, 8, 8, generator=g)
    return out


def test_loss_equals_the_equations():
    g = torch.Generator().manual_seed(0)
    G, B, N, K, L = 2, 3, 5, 7, 2
    s_cls = [torch.randn(B, K, generator=g) for _ in range(G + L)]
    s_patch_full = torch.randn(G, B, N, K, generator=g)
    t_cls, t_patch = torch.randn(G, B, K, generator=g), torch.randn(G, B, N, K, generator=g)
    c_cls, c_patch = torch.randn(1, K, generator=g) * 0.1, torch.randn(1, 1, K, generator=g) * 0.1
    masks = torch.rand(G, B, N, generator=g) < 0.5
    masks[1, 2] = False
    masks[0, 0] = True
    tau_s, tau_t, tau_tp = 0.1, 0.05, 0.06
    out = ibot_loss(s_cls, s_patch_full[masks], masks, t_cls, t_patch, c_cls, c_patch, tau_s, tau_t, tau_tp,
                    lambda1=1.0, lambda2=0.5)

    def softmax(v: list[float]) -> list[float]:
        mx = max(v)
        e = [math.exp(x - mx) for x in v]
        return [x / sum(e) for x in e]

    def ce(p_t: list[float], logits_s: list[float]) -> float:  # -sum_k P_t log softmax(s / tau_s)
        p_s = softmax([x / tau_s for x in logits_s])
        return -sum(a * math.log(b) for a, b in zip(p_t, p_s))

    # L_[CLS]: teacher global view q vs student view v != q (globals and locals), mean over images, then pairs
    terms = []
    for q in range(G):
        for v in range(G + L):
            if v == q:
                continue
            per_image = []
            for b in range(B):
                p_t = softmax([(t_cls[q, b, k] - c_cls[0, k]).item() / tau_t for k in range(K)])
                per_image.append(ce(p_t, s_cls[v][b].tolist()))
            terms.append(sum(per_image) / B)
    ref_cls = sum(terms) / len(terms)
    # L_MIM: same view, masked patches only, mean per image (0 when none is masked), then images, then views
    per_view = []
    for q in range(G):
        per_image = []
        for b in range(B):
            tot, cnt = 0.0, 0
            for i in range(N):
                if masks[q, b, i]:
                    p_t = softmax([(t_patch[q, b, i, k] - c_patch[0, 0, k]).item() / tau_tp for k in range(K)])
                    tot += ce(p_t, s_patch_full[q, b, i].tolist())
                    cnt += 1
            per_image.append(tot / max(cnt, 1))
        per_view.append(sum(per_image) / B)
    ref_patch = 0.5 * sum(per_view) / G
    assert out["cls"].item() == pytest.approx(ref_cls, rel=1e-5)
    assert out["patch"].item() == pytest.approx(ref_patch, rel=1e-5)
    assert out["loss"].item() == pytest.approx(ref_cls + ref_patch, rel=1e-5)
    assert (out["kl"] + out["teacher_entropy"]).item() == pytest.approx(out["loss"].item(), rel=1e-5)
    assert out["kl"].item() > 0


def test_ema_update_is_exact():
    m = tiny_ibot()
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(torch.randn_like(p))
    t0 = [p.detach().clone() for p in m.teacher.parameters()]
    s0 = [p.detach().clone() for p in m.student.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(t0, s0))
    m.after_step(4, 10)
    mom = cosine(3, 10, 0.996, 1.0)
    assert 0.996 < mom < 1.0
    for p, t, s in zip(m.teacher.parameters(), t0, s0):
        torch.testing.assert_close(p, mom * t + (1 - mom) * s, rtol=0, atol=1e-7)
    assert not any(p.requires_grad for p in m.teacher.parameters())
    assert m.momentum(1, 10) == pytest.approx(0.996) and m.momentum(10, 10) == 1.0
    assert int(m.step) == 4 and int(m.total_steps) == 10


def test_centers_follow_teacher_outputs():
    m = tiny_ibot()
    m.train()
    with torch.no_grad():
        m.center_cls.normal_()
        m.center_patch.normal_()
    c_cls, c_patch = m.center_cls.clone(), m.center_patch.clone()
    b = batch()
    x = b["global_crops"].transpose(0, 1).flatten(0, 1)  # (G*B, 3, H, W)
    with torch.no_grad():
        t = m.teacher.head(m.teacher.backbone.forward_features(x))  # (G*B, 1+N, K)
    m(b)
    torch.testing.assert_close(m.center_cls, 0.9 * c_cls + 0.1 * t[:, 0].mean(0, keepdim=True))
    torch.testing.assert_close(m.center_patch, 0.9 * c_patch + 0.1 * t[:, 1:].mean(1).mean(0).view(1, 1, -1))
    assert not m.teacher.training  # the teacher never drops paths
    m.eval()
    before = m.center_cls.clone()
    m(b)
    assert torch.equal(m.center_cls, before)  # evaluation does not move the centers


def test_teacher_temperature_warms_up_linearly():
    assert teacher_temperature(0, 0, 0.04, 0.07, 0.1) == 0.04  # before the first step
    assert teacher_temperature(0, 100, 0.04, 0.07, 0.1) == pytest.approx(0.04)
    assert teacher_temperature(9, 100, 0.04, 0.07, 0.1) == pytest.approx(0.07)
    assert teacher_temperature(3, 100, 0.04, 0.07, 0.1) == pytest.approx(0.04 + 0.03 * 3 / 9)
    assert teacher_temperature(50, 100, 0.04, 0.07, 0.1) == 0.07
    m = tiny_ibot(teacher_temp_warmup=0.5)
    _, met = m(batch())
    assert met["teacher_temp"].item() == pytest.approx(0.04)
    m.after_step(5, 10)
    _, met = m(batch())
    assert met["teacher_temp"].item() == pytest.approx(0.07)


def test_local_crops_enter_the_cls_loss_only():
    m = tiny_ibot()
    m.eval()  # centers fixed, no stochasticity
    a, b = batch(local=2, seed=1), batch(local=2, seed=1)
    b["local_crops"] = torch.randn_like(b["local_crops"])
    _, ma = m(a)
    _, mb = m(b)
    assert ma["patch"] == mb["patch"] and ma["cls"] != mb["cls"]
    loss, _ = m(a)
    loss.backward()
    assert m.student.backbone.pos_embed.grad.abs().sum() > 0


def test_freeze_last_layer_gives_no_gradient():
    m = tiny_ibot(freeze_last_layer=0.5)
    m.train()
    loss, _ = m(batch())
    loss.backward()
    assert m.student.head.last_layer.weight_v.grad is None
    assert m.student.head.mlp[0].weight.grad is not None and m.find_unused_parameters
    m.zero_grad()
    m.after_step(6, 10)
    m(batch())[0].backward()
    assert m.student.head.last_layer.weight_v.grad is not None


def test_transform_masks_and_crops(make_image_folder):
    from beit.data.folder import load_image
    from beit.methods.ibot import build_ibot_transform
    from beit.tasks.pretrain import build_config

    cfg = build_config("ibot_tiny_patch4_32", None, ["ibot.local_crops=2"])
    tf = build_ibot_transform(cfg.ibot, cfg.model)
    img = load_image(make_image_folder(classes=(), per_class=1) / "0.png")
    ratios = []
    for _ in range(40):
        out = tf(img)
        assert out["global_crops"].shape == (2, 3, 32, 32) and out["local_crops"].shape == (2, 3, 16, 16)
        assert out["masks"].shape == (2, 8, 8) and out["masks"].dtype == torch.bool
        ratios += (out["masks"].flatten(1).float().mean(1)).tolist()
    assert 0.2 < sum(r == 0 for r in ratios) / len(ratios) < 0.8  # about half the crops unmasked
    assert max(ratios) <= 0.5 + 1e-6 and min(r for r in ratios if r > 0) >= 0.05


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_after_sigkill_is_exact(tmp_path, make_image_folder):
    data = make_image_folder(classes=(), per_class=8)
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["--data", str(data), "--preset", "ibot_tiny_patch4_32", "--steps", "8", "ibot.local_crops=1",
            "ibot.freeze_last_layer=0.25", "ibot.teacher_temp_warmup=0.5"]
    pretrain_driver.main([str(full), *args])
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    killed = subprocess.run([*DRIVER, str(cut), *args, "--kill-at", "5"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert ckpt.latest_checkpoint(cut).name == "step_00000003"
    subprocess.run([*DRIVER, str(cut), *args, "--resume"], env=env, check=True, capture_output=True, timeout=300)
    a, b = _losses(full), _losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    wa, _, _ = read_checkpoint(ckpt.latest_checkpoint(full))
    wb, _, _ = read_checkpoint(ckpt.latest_checkpoint(cut))
    assert any(k.startswith("teacher.") for k in wa) and "center_cls" in wa and "step" in wa
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_trains_and_both_backbones_load(tmp_path, make_image_folder):
    data = make_image_folder(classes=(), per_class=16)
    run = tmp_path / "run"
    ov = [*TINY["ibot"], "train.steps=40", "train.batch_size=8", "train.num_workers=0", "train.log_every=1",
          "train.precision=fp32", "train.device=cpu", "optim.warmup_steps=2", "optim.lr=1e-3"]
    _, method = pretrain(str(run), str(data), "ibot_tiny_patch4_32", ov)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert len(rows) == 40 and all(math.isfinite(r["loss"]) for r in rows)
    # the student learns to match the teacher: KL(P_t || P_s) = loss - teacher entropy falls. The raw loss
    # need not fall in a short run: centering and the temperature warm-up raise the teacher's entropy.
    kl = [r["kl"] for r in rows]
    assert sum(kl[-5:]) / 5 < 0.75 * sum(kl[:5]) / 5, kl
    teacher = beit.load(run)
    student = beit.load(run, which="student")
    assert isinstance(teacher, VisionTransformer) and isinstance(student, VisionTransformer)
    ts = method.teacher.backbone.state_dict()
    assert all(torch.equal(v, ts[k]) for k, v in teacher.state_dict().items())
    assert not all(torch.equal(v, student.state_dict()[k]) for k, v in teacher.state_dict().items())
