"""BEiT masked image modeling: loss value, masked-only dependence, accuracy, ablation switches, tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from beit.config import ConfigError, ModelConfig, from_dict
from beit.methods import BEiTConfig, BEiTMethod, build_pretrain_transform
from beit.methods.beit import patchify
from beit.models.vit import VisionTransformer

VOCAB = 16
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)


class StubTokenizer(nn.Module):
    """Fixed random conv + argmax: ``(B, 3, 8, 8)`` in [0, 1] -> ``(B, 4, 4)`` ids; ``override`` rigs ids."""

    vocab_size = VOCAB

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, VOCAB, 2, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
        self.override: torch.Tensor | None = None
        self.calls = 0

    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert not torch.is_grad_enabled()
        if self.override is not None:
            return self.override
        return self.conv(images01).argmax(1)  # (B, 4, 4)


def _model(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(from_dict(ModelConfig, {**TINY, "vocab_size": VOCAB, **kw}))


def _batch(B: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, 4, 4, dtype=torch.bool)
    mask[0, 1:3, 1:3] = True  # a 2x2 block
    mask[1, 0, :] = True  # a row
    return {
        "images": torch.randn(B, 3, 16, 16, generator=g),
        "tok_images": torch.rand(B, 3, 8, 8, generator=g),
        "mask": mask,
    }


def _method(cfg: BEiTConfig | None = None, **kw) -> tuple[BEiTMethod, StubTokenizer]:
    tok = StubTokenizer()
    m = BEiTMethod(_model(**kw), tok, cfg or BEiTConfig())
    m.eval()
    return m, tok


def test_loss_equals_hand_computed_cross_entropy():
    m, tok = _method()
    batch = _batch()
    loss, metrics = m(batch)
    ids = tok.conv(batch["tok_images"]).argmax(1).flatten(1)  # (B, N)
    logits = m.model.forward_mim(batch["images"], batch["mask"])  # (M, V) row-major
    target = ids[batch["mask"].flatten(1)]
    assert logits.shape == (4 + 4, VOCAB) and target.shape == (8,)
    by_hand = sum(
        math.log(sum(math.exp(v) for v in row.tolist())) - row[t].item() for row, t in zip(logits, target)
    ) / len(target)
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    assert metrics["loss"].item() == pytest.approx(by_hand, rel=1e-5)
    assert not metrics["loss"].requires_grad
    loss.backward()
    assert m.model.lm_head.weight.grad is not None and m.model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_loss_depends_only_on_masked_targets():
    m, tok = _method()
    batch = _batch()
    base = torch.randint(0, VOCAB, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    tok.override = base
    loss0 = m(batch)[0].item()
    changed_unmasked = torch.where(batch["mask"], base, (base + 5) % VOCAB)
    tok.override = changed_unmasked
    assert m(batch)[0].item() == pytest.approx(loss0, abs=0.0)
    changed_masked = torch.where(batch["mask"], (base + 5) % VOCAB, base)
    tok.override = changed_masked
    assert abs(m(batch)[0].item() - loss0) > 1e-4

    m.cfg = BEiTConfig(predict="all")  # ablation: the loss now sees every position
    tok.override = base
    loss_all = m(batch)[0].item()
    tok.override = changed_unmasked
    assert abs(m(batch)[0].item() - loss_all) > 1e-4


def test_predict_all_is_mean_ce_over_every_position():
    m, tok = _method(BEiTConfig(predict="all"))
    batch = _batch()
    loss, metrics = m(batch)
    ids = tok.conv(batch["tok_images"]).argmax(1).flatten(1)
    tokens = m.model.forward_features(batch["images"], bool_masked_pos=batch["mask"])
    logits = m.model.lm_head(tokens[:, 1:])  # (B, N, V)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.flatten(0, 1), ids.flatten()).item(), rel=1e-5)
    # accuracy stays a masked-position metric, comparable across the ablation
    acc = (logits[batch["mask"].flatten(1)].argmax(-1) == ids[batch["mask"].flatten(1)]).float().mean()
    assert metrics["mlm_acc"].item() == pytest.approx(acc.item())


def test_mlm_acc_on_rigged_logits():
    class Rigged(nn.Module):
        """forward_mim returns one-hot logits predicting token 3 everywhere."""

        def __init__(self) -> None:
            super().__init__()
            self.cfg = from_dict(ModelConfig, {**TINY, "vocab_size": VOCAB})
            self.w = nn.Parameter(torch.zeros(()))

        def forward_mim(self, x, mask):
            n = int(mask.sum())
            return F.one_hot(torch.full((n,), 3), VOCAB).float() * 10 + self.w

    tok = StubTokenizer()
    m = BEiTMethod(Rigged(), tok)
    batch = _batch()
    ids = torch.zeros(2, 4, 4, dtype=torch.long)
    ids[0, 1, 1] = ids[0, 1, 2] = ids[0, 2, 1] = 3  # 3 of the 4 masked in image 0 are right
    ids[1, 0, 0] = 3  # 1 of the 4 masked in image 1; unmasked cells hold 3 too, which must not count
    ids[1, 3, 3] = 3
    tok.override = ids
    _, metrics = m(batch)
    assert metrics["mlm_acc"].item() == pytest.approx(4 / 8)


def test_tokenizer_is_frozen_and_not_saved():
    m, tok = _method()
    assert all(not k.startswith("tokenizer") for k in m.state_dict())
    assert {k for k in m.state_dict() if k.startswith("model.")} == {"model." + k for k in m.model.state_dict()}
    assert not any(p is q for p in m.parameters() for q in tok.parameters())
    assert all(not p.requires_grad for p in tok.parameters())
    m.train()
    assert m.model.training and not tok.training  # train() does not reach the tokenizer
    loss, _ = m(_batch())
    loss.backward()
    assert tok.conv.weight.grad is None and tok.calls == 1
    m2 = BEiTMethod(_model(), StubTokenizer())
    assert m2.load_state_dict(m.state_dict()) is not None  # strict load: same keys


def test_pixel_target_regresses_masked_patches():
    cfg = BEiTConfig(target="pixels")
    torch.manual_seed(0)
    m = BEiTMethod(VisionTransformer(from_dict(ModelConfig, {**TINY, "use_mask_token": True})), None, cfg).eval()
    assert m.pixel_head.out_features == 4 * 4 * 3
    batch = _batch()
    del batch["tok_images"]
    loss, metrics = m(batch)
    assert set(metrics) == {"loss"}
    mask = batch["mask"].flatten(1)
    tokens = m.model.forward_features(batch["images"], bool_masked_pos=mask)
    pred = m.pixel_head(tokens[:, 1:])  # (B, N, 48)
    target = patchify(batch["images"], 4)
    assert loss.item() == pytest.approx(F.mse_loss(pred[mask], target[mask]).item(), rel=1e-5)
    # targets at unmasked positions do not matter with predict=masked ...
    orig = m._pixel_targets
    m._pixel_targets = lambda images: torch.where(mask[..., None], orig(images), orig(images) + 3.0)
    assert m(batch)[0].item() == pytest.approx(loss.item(), abs=0.0)
    del m._pixel_targets
    # ... and predict=all uses them
    m.cfg = BEiTConfig(target="pixels", predict="all")
    loss_all, _ = m(batch)
    assert loss_all.item() == pytest.approx(F.mse_loss(pred, target).item(), rel=1e-5)
    loss_all.backward()
    assert m.pixel_head.weight.grad is not None
    m.cfg = BEiTConfig(target="pixels", norm_pix=True)
    normed = m(batch)[0]
    assert abs(normed.item() - loss.item()) > 1e-3


def test_patchify_layout():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    p = patchify(x, 4)  # (2, 4, 48)
    assert p.shape == (2, 4, 48)
    assert torch.equal(p[1, 1].view(4, 4, 3).permute(2, 0, 1), x[1, :, 0:4, 4:8])  # patch (0, 1), (row, col, C)


def test_empty_mask_gives_zero_loss_not_nan():
    m, _ = _method()
    batch = _batch()
    batch["mask"] = torch.zeros_like(batch["mask"])
    loss, metrics = m(batch)
    assert loss.item() == 0.0 and metrics["mlm_acc"].item() == 0.0
    loss.backward()


def test_build_and_transform_and_config_errors():
    from PIL import Image

    model_cfg = from_dict(ModelConfig, TINY)
    tok = StubTokenizer()
    m = BEiTMethod.build(model_cfg, tok, BEiTConfig())
    assert m.model.cfg.vocab_size == VOCAB and m.model.lm_head is not None
    mp = BEiTMethod.build(model_cfg, None, BEiTConfig(target="pixels"))
    assert mp.model.lm_head is None and mp.model.mask_token is not None

    img = Image.new("RGB", (40, 30), (200, 100, 50))
    for kind, exact in (("random", True), ("block", False)):
        tf = build_pretrain_transform(BEiTConfig(masking=kind, min_block=2), model_cfg, tokenizer_img_size=8)
        torch.manual_seed(0)
        s = tf(img)
        assert s["images"].shape == (3, 16, 16) and s["tok_images"].shape == (3, 8, 8)
        assert s["mask"].shape == (4, 4)
        n = int(s["mask"].sum())
        assert n == 6 if exact else 0 < n <= 6  # round(0.4 * 16)
    sp = build_pretrain_transform(BEiTConfig(target="pixels"), model_cfg, tokenizer_img_size=None)
    torch.manual_seed(0)
    assert "tok_images" not in sp(img)
    # a sample batch runs through the method end to end
    batch = {k: torch.stack([tf(img)[k] for _ in range(2)]) for k in ("images", "tok_images", "mask")}
    loss, metrics = m(batch)
    assert torch.isfinite(loss) and 0.0 <= metrics["mlm_acc"].item() <= 1.0

    with pytest.raises(ConfigError):
        BEiTConfig(target="features")
    with pytest.raises(ConfigError):
        BEiTConfig(predict="visible")
    with pytest.raises(ConfigError):
        BEiTConfig(masking="grid")
    with pytest.raises(ConfigError):
        BEiTMethod(_model(), None, BEiTConfig())  # tokens need a tokenizer
    with pytest.raises(ConfigError):
        BEiTMethod(_model(vocab_size=8), StubTokenizer())  # vocabulary mismatch
    with pytest.raises(ConfigError):
        build_pretrain_transform(BEiTConfig(), model_cfg, tokenizer_img_size=None)
    assert from_dict(BEiTConfig, {"masking": "random", "crop_scale": [0.2, 1.0]}).crop_scale == (0.2, 1.0)


def test_with_the_dvae_tokenizer():
    dvae = pytest.importorskip("beit.models.tokenizer")
    tok = dvae.Tokenizer(dvae.get_tokenizer_preset("dvae_32"))
    model_cfg = from_dict(ModelConfig, {**TINY, "img_size": 32})  # 8x8 grid, like dvae_32's 8x8 tokens
    m = BEiTMethod.build(model_cfg, tok, BEiTConfig(min_block=4))
    assert m.model.cfg.vocab_size == tok.vocab_size
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, 2:5, 3:7] = True
    batch = {"images": torch.randn(2, 3, 32, 32, generator=g), "tok_images": torch.rand(2, 3, 32, 32, generator=g),
             "mask": mask}
    loss, metrics = m(batch)
    assert abs(loss.item() - math.log(tok.vocab_size)) < 1.0  # near-uniform predictions at init
    assert not any(k.startswith("tokenizer") for k in m.state_dict())


def test_visual_tokens_are_fp32_ids_under_bf16_autocast():
    """The targets must not depend on the step's precision: the tokenizer runs in fp32 (and channels-last,
    which must not change the ids of the plain NCHW computation)."""
    from beit.models.tokenizer import Tokenizer, get_tokenizer_preset

    torch.manual_seed(0)
    tok = Tokenizer(get_tokenizer_preset("dvae_32")).eval()  # random weights: ids spread over the vocabulary
    m = BEiTMethod.build(from_dict(ModelConfig, {**TINY, "img_size": 32}), tok, BEiTConfig(min_block=4))
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = tok.encode_logits(x).argmax(1).flatten(1)  # fp32, NCHW
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ids = m.visual_tokens(x)
            bf16 = tok.encode_logits(x).argmax(1).flatten(1)
    assert torch.equal(ids, reference)
    assert not torch.equal(bf16, reference)  # bf16 would have changed some ids: the test can fail
