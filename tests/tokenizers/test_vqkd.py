"""VQ-KD (BEiT v2): codebook metrics, straight-through gradients, the normalised EMA update against a hand
computation, dead-code restarts, the official checkpoint conversion against a reference written from the paper,
patch aggregation, and MAE teacher -> VQ-KD tokenizer -> BEiT with patch aggregation -> ``beit.load``."""

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
import torch.nn.functional as F

import beit
from beit.cli import main
from beit.config import ConfigError, ModelConfig, replace
from beit.exporting import export_model
from beit.loading import load_tokenizer
from beit.methods.beit import BEiTConfig, BEiTMethod
from beit.models.tokenizer import Tokenizer, save_tokenizer
from beit.models.tokenizer import TokenizerConfig as DVAEConfig
from beit.models.vit import VisionTransformer
from beit.models.vqkd import VQKDConfig, VQKDTokenizer, get_vqkd_preset
from beit.tokenizers import ObjectiveConfig, VQObjective
from beit.tokenizers.beit2 import convert_beit2
from beit.tokenizers.vqkd import (
    Teacher,
    VQKDObjective,
    VQKDObjectiveConfig,
    ema_codebook_update,
    evaluate_vqkd,
)
from tests.helpers.paths import ROOT
from tests.helpers.pretrain_driver import TINY as PRETRAIN_TINY
from tests.helpers.pretrain_driver import pretrain

TINY = dict(img_size=16, patch_size=4, vocab_size=16, embed_dim=8, encoder_dim=32, encoder_depth=1, encoder_heads=2,
            decoder_dim=32, decoder_depth=1, decoder_heads=2, target_dim=24)


def tiny_teacher(dim: int = 24, img: int = 16) -> Teacher:
    torch.manual_seed(1)
    return Teacher(VisionTransformer(ModelConfig(img_size=img, patch_size=4, embed_dim=dim, depth=2, num_heads=2)))


def tiny_objective(**cfg) -> VQKDObjective:
    torch.manual_seed(0)
    return VQKDObjective(VQKDTokenizer(VQKDConfig(**TINY)), tiny_teacher(), VQKDObjectiveConfig(**cfg))


def test_usage_perplexity_and_teacher_cosine_by_hand():
    obj = tiny_objective()
    tok, tch = obj.tokenizer, obj.teacher
    x = torch.rand(4, 3, 16, 16)
    ids = torch.zeros(4, 4, 4, dtype=torch.long)  # rigged code frequencies: 0 x 32, 1 x 16, 2 x 8, 3 x 8
    ids[2:] = 1
    ids[3, :2], ids[3, 2:] = 2, 3
    tok.encode = lambda images: ids[: len(images)]  # type: ignore[method-assign]
    res = evaluate_vqkd(tok, tch, x, batch_size=4)
    p = [0.5, 0.25, 0.125, 0.125]
    assert res["codebook_usage"] == pytest.approx(4 / 16)
    assert res["perplexity"] == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)))  # 2^1.75
    with torch.no_grad():
        pred = tok.decode_features(tok.codebook[ids])  # (4, 16, 24)
        cos = F.cosine_similarity(pred, tch.features(x, (4, 4)), dim=-1).mean()
    assert res["teacher_cos"] == pytest.approx(float(cos), abs=1e-5) and res["num_images"] == 4


def test_preset_shapes_and_teacher_at_its_own_resolution():
    tok = VQKDTokenizer(replace(get_vqkd_preset("vqkd_32"), target_dim=24)).eval()
    ids = tok.encode(torch.rand(2, 3, 32, 32))
    assert ids.shape == (2, 8, 8) and int(ids.max()) < 1024 and tok.codebook.shape == (1024, 32)
    assert torch.allclose(tok.codebook.norm(dim=1), torch.ones(1024))
    # a 32 px teacher (8x8 grid) for a 16 px tokenizer (4x4 grid): the image goes up, the features come down
    tch = tiny_teacher(img=32)
    x = torch.rand(2, 3, 16, 16)
    f = tch.features(x, (4, 4))
    up = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    full = tch.features(up, (8, 8))  # (2, 64, 24) on the teacher's own grid
    down = F.interpolate(full.transpose(1, 2).reshape(2, 24, 8, 8), size=(4, 4), mode="bilinear",
                         align_corners=False, antialias=True).flatten(2).transpose(1, 2)
    assert f.shape == (2, 16, 24) and torch.allclose(f, down, atol=1e-5)
    with pytest.raises(ConfigError, match="teacher_block"):
        Teacher(tch.model, block=2)


def test_straight_through_gradients_reach_the_encoder():
    obj = tiny_objective(commitment=0.0)  # the only path into the encoder is the straight-through one
    tok = obj.tokenizer
    x = torch.rand(2, 3, 16, 16)
    loss, _ = obj(x)
    loss.backward()
    grads = [p.grad for p in tok.encoder.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    # the encoder receives exactly the decoder's gradient with respect to the quantized codes
    obj.eval()
    z = tok.encode_vectors(x)
    z.retain_grad()
    ids = tok.nearest_code(z.detach())
    zq = tok.codebook[ids].clone().requires_grad_(True)
    target = obj.teacher.features(x, tok.grid_size)
    F.cosine_similarity(tok.decode_features(z + (tok.codebook[ids] - z).detach()), target, dim=-1).sum().backward()
    F.cosine_similarity(tok.decode_features(zq), target, dim=-1).sum().backward()
    assert torch.allclose(z.grad, zq.grad, atol=1e-6) and float(z.grad.abs().sum()) > 0


def test_ema_update_equals_hand_computation():
    s = 1 / math.sqrt(2)
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [s, s]])
    cluster = torch.tensor([2.0, 1.0, 0.5])
    z = torch.tensor([[0.6, 0.8], [0.8, 0.6], [0.0, -1.0], [1.0, 0.0]])
    ids = torch.tensor([0, 0, 1, 0])
    counts = ema_codebook_update(codebook, cluster, z, ids, decay=0.9)
    assert counts.tolist() == [3.0, 1.0, 0.0]
    assert torch.allclose(cluster, torch.tensor([0.9 * 2 + 0.1 * 3, 0.9 * 1 + 0.1 * 1, 0.9 * 0.5]))
    # code 0: mean of its three vectors (2.4/3, 1.4/3) normalised, then 0.9 * old + 0.1 * that, normalised
    m = torch.tensor([2.4, 1.4]) / math.hypot(2.4, 1.4)
    e0 = torch.tensor([0.9, 0.0]) + 0.1 * m
    # code 1: its one vector (0, -1); 0.9 * (0, 1) + 0.1 * (0, -1) = (0, 0.8) -> (0, 1)
    expected = torch.stack([e0 / e0.norm(), torch.tensor([0.0, 1.0]), torch.tensor([s, s])])  # code 2 unused: kept
    assert torch.allclose(codebook, expected, atol=1e-6)
    assert torch.allclose(codebook.norm(dim=1), torch.ones(3))


def test_dead_codes_restart_at_batch_vectors():
    obj = tiny_objective(dead_code_threshold=0.5, ema_decay=0.9)
    tok = obj.tokenizer
    obj.cluster_size.fill_(10.0)
    obj.cluster_size[3] = 0.2  # decays to 0.18 without a vector: dead
    before = tok.codebook.clone()
    z = F.normalize(torch.randn(40, 8), dim=-1)
    ids = torch.full((40,), 5, dtype=torch.long)  # every vector goes to code 5
    obj.update_codebook(z, ids)
    dist = (tok.codebook[3][None] - z).norm(dim=1)
    assert float(dist.min()) < 1e-6  # restarted at one of the batch's vectors
    assert float(obj.cluster_size[3]) == 0.5  # the threshold: unused next step, it is re-sampled
    alive = [k for k in range(16) if k not in (3, 5)]
    assert torch.equal(tok.codebook[alive], before[alive])  # unused live codes do not move (EMA count 9 > 0.5)
    # and the objective's first training step starts the codebook at encoder outputs
    obj2 = tiny_objective()
    x = torch.rand(2, 3, 16, 16)
    obj2.train()
    obj2(x)
    assert bool(obj2.initialized)


@pytest.mark.parametrize("quantizer", ["vq", "vqkd"])
def test_codebook_objectives_train_the_same_under_torch_compile(quantizer):
    """The EMA codebook update waits for the end of the optimiser step: updated inside forward, it changed a
    buffer that the compiled graph had kept for its backward (the VQ-KD study's tokenizer failed so)."""
    def build():
        if quantizer == "vqkd":
            return tiny_objective()
        torch.manual_seed(0)
        cfg = DVAEConfig(img_size=16, vocab_size=16, n_hid=16, n_groups=3, n_blk_per_group=1, n_init=32,
                         quantizer="vq", embed_dim=4)
        return VQObjective(Tokenizer(cfg), ObjectiveConfig(dead_code_threshold=0.2))

    def codebook(obj):
        cb = obj.tokenizer.codebook
        return (cb if quantizer == "vqkd" else cb.embed).detach().clone()

    images = torch.rand(4, 4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        obj = build().train()
        forward = torch.compile(obj) if compiled else obj
        opt = torch.optim.SGD(obj.tokenizer.parameters(), lr=0.1)
        losses = []
        for step, x in enumerate(images, 1):
            torch.manual_seed(step)  # the codebook's start and restarts draw rows
            loss, _ = forward(x)
            loss.backward()
            opt.step()
            opt.zero_grad()
            obj.after_step(step, len(images))
            losses.append(float(loss))
        assert not getattr(obj, "_pending", None) and bool(obj.initialized)  # nothing left queued
        runs.append((losses, codebook(obj)))
    (eager, cb_eager), (comp, cb_comp) = runs
    assert comp == pytest.approx(eager, rel=1e-4) and len(set(eager)) == len(eager)
    assert torch.allclose(cb_comp, cb_eager, atol=1e-4) and not torch.equal(cb_eager, codebook(build()))


# --------------------------------------------------------------------------------------------- official format


def _official_vit(prefix: str, in_chans: int, patch: int, grid: int, dim: int, depth: int, g) -> dict:
    """The state dict of unilm beit2 ``modeling_finetune.VisionTransformer`` (mean pooling: ``fc_norm``,
    qkv without bias + ``q_bias``/``v_bias``, no LayerScale), random weights."""
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    sd = {f"{prefix}.cls_token": r(1, 1, dim), f"{prefix}.pos_embed": r(1, grid * grid + 1, dim),
          f"{prefix}.patch_embed.proj.weight": r(dim, in_chans, patch, patch), f"{prefix}.patch_embed.proj.bias": r(dim),
          f"{prefix}.fc_norm.weight": 1 + r(dim), f"{prefix}.fc_norm.bias": r(dim)}
    for i in range(depth):
        b = f"{prefix}.blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim), b + "attn.qkv.weight": r(3 * dim, dim),
                   b + "attn.q_bias": r(dim), b + "attn.v_bias": r(dim), b + "attn.proj.weight": r(dim, dim),
                   b + "attn.proj.bias": r(dim), b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
                   b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
                   b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim)})
    return sd


def _reference_ids(sd: dict, images: torch.Tensor, heads: int, depth: int) -> torch.Tensor:
    """BEiT v2 tokenisation written from the paper on the official names: ``2x - 1`` -> ViT -> fc_norm on the
    patch tokens -> Linear-Tanh-Linear -> l2 normalise -> the code of highest cosine (Eq. 1)."""
    p = lambda k: sd[f"encoder.{k}"]  # noqa: E731
    x = F.conv2d(images * 2 - 1, p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=p(
        "patch_embed.proj.weight").shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([p("cls_token").expand(len(x), -1, -1), x], 1) + p("pos_embed")
    B, T, D = x.shape
    for i in range(depth):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (D,), p(b + "norm1.weight"), p(b + "norm1.bias"), eps=1e-6)
        qkv = h @ p(b + "attn.qkv.weight").t() + torch.cat([p(b + "attn.q_bias"), torch.zeros(D), p(b + "attn.v_bias")])
        q, k, v = qkv.reshape(B, T, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) / math.sqrt(D // heads)).softmax(-1)
        x = x + (a @ v).transpose(1, 2).reshape(B, T, D) @ p(b + "attn.proj.weight").t() + p(b + "attn.proj.bias")
        h = F.layer_norm(x, (D,), p(b + "norm2.weight"), p(b + "norm2.bias"), eps=1e-6)
        x = x + F.gelu(h @ p(b + "mlp.fc1.weight").t() + p(b + "mlp.fc1.bias")) @ p(b + "mlp.fc2.weight").t() \
            + p(b + "mlp.fc2.bias")
    t = F.layer_norm(x[:, 1:], (D,), p("fc_norm.weight"), p("fc_norm.bias"), eps=1e-6)
    t = torch.tanh(t @ sd["encode_task_layer.0.weight"].t() + sd["encode_task_layer.0.bias"])
    z = F.normalize(t @ sd["encode_task_layer.2.weight"].t() + sd["encode_task_layer.2.bias"], dim=-1)
    codes = F.normalize(sd["quantize.embedding.weight"], dim=-1)
    return (z @ codes.t()).argmax(-1).reshape(B, 4, 4)


class _Touch:
    """A pickle that creates a file when loaded without ``weights_only``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_official_checkpoint_converts_with_equal_ids(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {**_official_vit("encoder", 3, 4, 4, 32, 2, g), **_official_vit("decoder", 8, 1, 4, 16, 1, g)}
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    sd.update({"encode_task_layer.0.weight": r(32, 32), "encode_task_layer.0.bias": r(32),
               "encode_task_layer.2.weight": r(8, 32), "encode_task_layer.2.bias": r(8),
               "decode_task_layer.0.weight": r(16, 16), "decode_task_layer.0.bias": r(16),
               "decode_task_layer.2.weight": r(12, 16), "decode_task_layer.2.bias": r(12),
               "quantize.embedding.weight": torch.randn(64, 8, generator=g),  # not unit rows: normalised on the way
               "quantize.embedding.cluster_size": torch.rand(64), "quantize.embedding.embed_avg": r(64, 8),
               "quantize.embedding.initted": torch.ones(1), "quantize.cluster_size": torch.rand(64),
               "teacher_model.visual.proj": r(8, 8), "scaling_layer.shift": r(1, 3, 1, 1)})
    ckpt = tmp_path / "vqkd.pth"
    torch.save({"model": sd}, ckpt)
    out = convert_beit2(ckpt, tmp_path / "tok", encoder_heads=2, decoder_heads=2)
    tok = beit.load(tmp_path / "tok")
    assert isinstance(tok, VQKDTokenizer) and tok.vocab_size == 64 and tok.cfg.img_size == 16
    assert (tok.cfg.target_dim, tok.cfg.decoder_dim, tok.cfg.encoder_depth) == (12, 16, 2)
    images = torch.rand(6, 3, 16, 16, generator=g)
    ref = _reference_ids(sd, images, heads=2, depth=2)
    assert torch.equal(tok.encode(images), ref) and len(ref.unique()) > 3
    with pytest.raises(Exception, match="exists"):
        convert_beit2(ckpt, tmp_path / "tok")  # never overwrites
    assert out.name == "tokenizer.safetensors"
    marker = tmp_path / "pwned"
    torch.save({"model": {"encoder.cls_token": _Touch(marker)}}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="cannot read it as plain tensors"):
        convert_beit2(tmp_path / "evil.pth", tmp_path / "evil")
    assert not marker.exists()  # nothing was executed
    del sd["quantize.embedding.weight"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(Exception, match="not a BEiT v2 VQ-KD checkpoint"):
        convert_beit2(tmp_path / "bad.pth", tmp_path / "bad")


# --------------------------------------------------------------------------------------------- pretraining


def test_patch_aggregation_head_loss_and_backbone():
    torch.manual_seed(0)
    cfg = ModelConfig(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.0)
    tok = VQKDTokenizer(VQKDConfig(**TINY)).eval()
    with pytest.raises(ConfigError, match="patch_aggregation_block"):
        BEiTMethod.build(cfg, tok, BEiTConfig(patch_aggregation=True, patch_aggregation_block=3))
    method = BEiTMethod.build(cfg, tok, BEiTConfig(patch_aggregation=True))  # block 2 of 0..3 (3/4 of the depth)
    assert method.aggregation.block == 2
    images, tok_images = torch.randn(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::3] = True
    loss, m = method({"images": images, "tok_images": tok_images, "mask": mask})
    assert float(loss.detach()) == pytest.approx(float(m["mlm_loss"] + m["agg_loss"]), rel=1e-6)
    # the main loss is exactly plain BEiT's (forward_mim on the same backbone)
    ids = method.visual_tokens(tok_images)
    ref = F.cross_entropy(method.model.forward_mim(images, mask).float(), ids[mask])
    assert float(m["mlm_loss"]) == pytest.approx(float(ref.detach()), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in method.aggregation.parameters())
    assert not any(k.startswith("aggregation") for k in method.model.state_dict())


def test_feature_regression_target_by_hand():
    """The ablation without quantisation: BEiT regressing the teacher's features (``1 - cos``) at masked patches."""
    torch.manual_seed(0)
    cfg = ModelConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)
    method = BEiTMethod.build(cfg, None, BEiTConfig(target="teacher", teacher="runs/mae", teacher_block=1))
    assert method.teacher_request == ("runs/mae", 1)
    tch = tiny_teacher()
    method.attach_teacher(tch)
    assert method.teacher_request is None and method.feature_head.out_features == 24
    images, tok_images = torch.randn(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :5], mask[1, 7:9] = True, True
    loss, m = method({"images": images, "tok_images": tok_images, "mask": mask})
    pred = method.feature_head(method.model.forward_features(images, bool_masked_pos=mask)[:, 1:][mask])  # (7, 24)
    ref = 1 - F.cosine_similarity(pred, tch.features(tok_images, (4, 4))[mask], dim=-1)
    assert float(loss.detach()) == pytest.approx(float(ref.mean().detach()), rel=1e-5)
    assert float(m["feat_cos"]) == pytest.approx(1 - float(ref.mean().detach()), rel=1e-5)
    loss.backward()
    assert method.feature_head.weight.grad is not None and method.model.patch_embed.proj.weight.grad is not None
    with pytest.raises(ConfigError, match="predict"):
        BEiTConfig(target="teacher", predict="all")


def test_mae_teacher_to_vqkd_to_beit_with_patch_aggregation(tmp_path, make_image_folder, capsys):
    data = make_image_folder(tmp_path / "train", classes=(), per_class=8, size=32, seed=0)
    val = make_image_folder(tmp_path / "val", classes=(), per_class=4, size=32, seed=1)
    common = ["train.batch_size=4", "train.num_workers=0", "train.log_every=1", "train.precision=fp32",
              "train.device=cpu"]
    teacher = tmp_path / "mae"
    pretrain(str(teacher), str(data), "mae_tiny_patch4_32", [*PRETRAIN_TINY["mae"], "train.steps=2", *common])
    tok_run = tmp_path / "vqkd"
    small = ["model.vocab_size=32", "model.encoder_dim=32", "model.encoder_depth=1", "model.encoder_heads=2",
             "model.decoder_dim=32", "model.decoder_heads=2", "vqkd.teacher_block=0"]
    assert main(["tokenizer", "train", "--objective", "vqkd", "--teacher", str(teacher), "--data", str(data),
                 "--val-data", str(val), "--out", str(tok_run), "--steps", "3", *small, *common]) == 0
    rows = [json.loads(ln) for ln in (tok_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "rec" in r] == [1, 2, 3]
    ev = json.loads((tok_run / "eval.json").read_text())
    assert 0 < ev["codebook_usage"] <= 1 and 1 <= ev["perplexity"] <= 32 and -1 <= ev["teacher_cos"] <= 1
    tok = load_tokenizer(tok_run)
    assert isinstance(tok, VQKDTokenizer) and tok.cfg.target_dim == 48  # the MAE teacher's width
    assert main(["tokenizer", "eval", "--tokenizer", str(tok_run), "--data", str(val), "--json"]) == 0  # its teacher
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["teacher"] == str(teacher) and res["teacher_cos"] == pytest.approx(ev["teacher_cos"], abs=1e-5)
    assert res["codebook_usage"] == pytest.approx(ev["codebook_usage"])
    run = tmp_path / "beit"
    assert main(["pretrain", "--data", str(data), "--tokenizer", str(tok_run), "--out", str(run), "--steps", "2",
                 "--batch-size", "4", "--precision", "fp32", "model.depth=2", "model.embed_dim=32",
                 "model.num_heads=2", "beit.patch_aggregation=true", "train.num_workers=0",
                 "train.log_every=1"]) == 0
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("agg_loss" in r for r in rows if "loss" in r) and "vocab_size: 32" in (run / "config.yaml").read_text()
    model = beit.load(run)
    assert isinstance(model, VisionTransformer) and len(model.blocks) == 2
    fresh = VisionTransformer(model.cfg)
    assert set(model.state_dict()) == set(fresh.state_dict())  # no aggregation head in the backbone
    # the ablation: the same teacher's features regressed directly, no tokenizer
    run = tmp_path / "featmim"
    assert main(["pretrain", "--data", str(data), "--out", str(run), "--steps", "2", "--batch-size", "4",
                 "--precision", "fp32", "model.depth=2", "model.embed_dim=32", "model.num_heads=2",
                 "beit.target=teacher", f"beit.teacher={teacher}", "train.num_workers=0", "train.log_every=1"]) == 0
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "feat_cos" in r] == [1, 2]
    model = beit.load(run)
    assert set(model.state_dict()) == set(VisionTransformer(model.cfg).state_dict())  # no feature head


def test_eval_command_and_errors(tmp_path, make_image_folder, capsys):
    torch.manual_seed(0)
    teacher = VisionTransformer(ModelConfig(img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=2))
    tdir = export_model(teacher, tmp_path / "teacher", "timm")
    save_tokenizer(VQKDTokenizer(VQKDConfig(**TINY)), tmp_path / "tok")
    data = make_image_folder(tmp_path / "imgs", classes=(), per_class=3, size=16)
    assert main(["tokenizer", "eval", "--tokenizer", str(tmp_path / "tok"), "--data", str(data)]) == 2
    assert "--teacher" in capsys.readouterr().err
    assert main(["tokenizer", "eval", "--tokenizer", str(tmp_path / "tok"), "--data", str(data),
                 "--teacher", str(tdir), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["num_images"] == 3 and {"codebook_usage", "perplexity", "teacher_cos"} <= set(res)
    # a tokenizer is no teacher: one line
    assert main(["tokenizer", "train", "--objective", "vqkd", "--teacher", str(tmp_path / "tok"), "--data", str(data),
                 "--out", str(tmp_path / "r"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a backbone" in err and "\n" not in err
    assert Path(tdir).exists()


def test_resume_after_sigkill_is_exact(tmp_path, make_image_folder):
    """The codebook, its EMA counts and the restart RNG are run state: a killed run resumes to the same numbers."""
    torch.manual_seed(0)
    teacher = export_model(VisionTransformer(ModelConfig(img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=2)),
                     tmp_path / "teacher", "timm")
    data = make_image_folder(tmp_path / "imgs", classes=(), per_class=8, size=16)
    small = [f"model.{k}={v}" for k, v in TINY.items() if k != "target_dim"]
    args = ["tokenizer", "train", "--objective", "vqkd", "--teacher", str(teacher), "--data", str(data), "--steps", "6",
            "--batch-size", "4", "--precision", "fp32", "train.ckpt_every=3", "train.log_every=1",
            "train.num_workers=0", *small]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    drv = [sys.executable, "-m", "tests.helpers.kill_driver"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run([*drv, "0", *args, "--out", str(full)], env=env, check=True, capture_output=True, timeout=300)
    p = subprocess.run([*drv, "4", *args, "--out", str(cut)], env=env, capture_output=True, timeout=300)
    assert p.returncode == -signal.SIGKILL
    subprocess.run([*drv, "0", *args, "--out", str(cut), "--resume"], env=env, check=True, capture_output=True,
                   timeout=300)

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}

    assert sorted(losses(full)) == list(range(1, 7)) and losses(full) == losses(cut)
    assert torch.equal(load_tokenizer(full).codebook, load_tokenizer(cut).codebook)
