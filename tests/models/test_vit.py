"""The backbone: presets, masking, MIM head, attention paths, relative positions, init."""

from __future__ import annotations

import math

import pytest
import torch

from beit.config import ConfigError, ModelConfig
from beit.models import PRESETS, VisionTransformer, create_model, get_preset
from beit.models.vit import relative_position_index


def tiny(**kw) -> VisionTransformer:
    base = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)
    base.update(kw)
    torch.manual_seed(0)
    m = VisionTransformer(ModelConfig(**base)).eval()
    with torch.no_grad():  # make zero-initialised tables and tokens matter
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes(name):
    cfg = get_preset(name)
    expected = {
        "beit_tiny_patch16_224": (224, 16, 192, 12, 3),
        "beit_small_patch16_224": (224, 16, 384, 12, 6),
        "beit_base_patch16_224": (224, 16, 768, 12, 12),
        "beit_large_patch16_224": (224, 16, 1024, 24, 16),
        "beit_tiny_patch4_32": (32, 4, 192, 6, 3),
        "beit_small_patch8_64": (64, 8, 384, 12, 6),
    }[name]
    assert (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads) == expected
    if name == "beit_large_patch16_224":
        assert cfg.layer_scale_init == 1e-5
    if cfg.img_size <= 64:
        m = create_model(name, depth=2, num_classes=7).eval()
        x = torch.randn(2, 3, cfg.img_size, cfg.img_size)
        assert m(x).shape == (2, 7)
        assert m.forward_features(x).shape == (2, 1 + cfg.num_patches, cfg.embed_dim)


def test_base_224_param_count():
    with torch.device("meta"):  # shapes only: no memory, no init time
        m = create_model("beit_base_patch16_224", num_classes=1000, use_rel_pos_bias=True,
                         use_shared_rel_pos_bias=False)
    n = sum(p.numel() for p in m.parameters())
    assert 86e6 < n < 87.5e6  # BEiT-base fine-tuned: ~86.5M


def test_unknown_preset_and_override():
    with pytest.raises(ConfigError, match="beit_base_patch16_224"):
        get_preset("beit_bse_patch16_224")
    with pytest.raises(ConfigError, match="depth"):
        create_model("beit_tiny_patch4_32", deptth=2)


def test_masked_patch_embeddings_are_ignored():
    m = tiny(vocab_size=16)
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 1, 2] = True
    mask[1, 3, 0] = True
    y = m.forward_features(x, mask)
    x2 = x.clone()
    x2[:, :, 8:16, 16:24] = torch.randn(2, 3, 8, 8) * 10  # a masked patch of both images
    x2[1, :, 24:32, 0:8] = 5.0
    torch.testing.assert_close(m.forward_features(x2, mask), y, rtol=0, atol=0)
    x3 = x.clone()
    x3[:, :, 0:8, 0:8] += 1.0  # an unmasked patch
    assert not torch.allclose(m.forward_features(x3, mask), y)
    # the masked slot carries the [MASK] embedding: same for both images before the blocks
    assert m.mask_token is not None and "mask_token" in m.no_weight_decay()


def test_forward_mim_equals_head_on_masked_tokens():
    m = tiny(vocab_size=50)
    x = torch.randn(3, 3, 32, 32)
    mask = torch.rand(3, 16) < 0.4
    logits = m.forward_mim(x, mask)
    ref = m.lm_head(m.forward_features(x, mask)[:, 1:])[mask]
    assert logits.shape == (int(mask.sum()), 50)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x, mask.reshape(3, 4, 4)), ref, rtol=1e-5, atol=1e-5)
    assert m(x).shape == (3, 17, 32)  # no classes, no mask: features


@pytest.mark.parametrize("shared,per_layer", [(True, False), (False, True), (True, True), (False, False)])
def test_attention_paths_agree(shared, per_layer):
    m = tiny(use_shared_rel_pos_bias=shared, use_rel_pos_bias=per_layer, use_abs_pos_emb=not shared)
    x = torch.randn(2, 3, 32, 32)
    attn = m.get_attention(x, layer=-1)
    assert attn.shape == (2, 2, 17, 17)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 17))
    tok, sb, idx = m._embed(x, None, None)
    for blk in m.blocks:
        fused = blk(tok, sb, idx)
        explicit, _ = blk(tok, sb, idx, return_attn=True)
        torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)
        tok = fused


def test_relative_bias_gradients_through_sdpa():
    m = tiny(use_shared_rel_pos_bias=False, use_rel_pos_bias=True)
    x = torch.randn(2, 3, 32, 32)
    blk = m.blocks[0]
    tok, sb, idx = m._embed(x, None, None)
    table = blk.attn.relative_position_bias_table
    g1 = torch.autograd.grad(blk(tok, sb, idx).square().sum(), table)[0]
    g2 = torch.autograd.grad(blk(tok, sb, idx, return_attn=True)[0].square().sum(), table)[0]
    assert g1.abs().sum() > 0
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_relative_position_index_layout():
    idx = relative_position_index((2, 3))
    nrd = (2 * 2 - 1) * (2 * 3 - 1) + 3
    assert idx.shape == (7, 7)
    assert idx[0, 0] == nrd - 1 and idx[0, 1] == nrd - 3 and idx[1, 0] == nrd - 2
    assert idx[1:, 1:].max() < nrd - 3
    # same offset -> same row; patch (0,0)->(0,0) is the centre of the (2h-1)x(2w-1) grid
    assert idx[1, 1] == idx[2, 2] == (2 - 1) * (2 * 3 - 1) + (3 - 1)


def test_ids_keep_gathers_tokens_and_relative_bias():
    m = tiny(use_shared_rel_pos_bias=True, use_rel_pos_bias=True, use_abs_pos_emb=True)
    x = torch.randn(2, 3, 32, 32)
    full = m.forward_features(x)
    perm = torch.stack([torch.randperm(16), torch.randperm(16)])  # all patches, shuffled
    out = m.forward_features(x, ids_keep=perm)
    ref = torch.cat([full[:, :1], full[:, 1:].gather(1, perm[..., None].expand(-1, -1, 32))], dim=1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    keep = perm[:, :5]
    sub = m.forward_features(x, ids_keep=keep)
    assert sub.shape == (2, 6, 32)
    # reference: run the blocks by hand on the subset with the bias sliced from the full bias
    tok, sb, idx = m._embed(x, None, None)
    sel = torch.cat([torch.zeros(2, 1, dtype=torch.long), keep + 1], 1)
    tok = tok.gather(1, sel[..., None].expand(-1, -1, 32))
    for b in range(2):
        t = tok[b : b + 1]
        for blk in m.blocks:
            bias = sb[0][:, sel[b]][:, :, sel[b]][None]  # shared table, sliced from the full bias
            y = blk.attn(blk.norm1(t), bias, idx[sel[b]][:, sel[b]])  # own table, sliced index
            t = t + blk.gamma_1 * y
            t = t + blk.gamma_2 * blk.mlp(blk.norm2(t))
        torch.testing.assert_close(sub[b : b + 1], m.norm(t), rtol=1e-5, atol=1e-5)


def test_intermediate_layers_and_head():
    m = tiny(num_classes=5)  # mean pooling + classes: norm is Identity, fc_norm a LayerNorm
    assert isinstance(m.norm, torch.nn.Identity) and isinstance(m.fc_norm, torch.nn.LayerNorm)
    x = torch.randn(2, 3, 32, 32)
    outs = m.get_intermediate_layers(x, [0, -1])
    assert len(outs) == 2 and outs[0].shape == (2, 17, 32)
    torch.testing.assert_close(outs[1], m.forward_features(x))
    assert len(m.get_intermediate_layers(x, 2)) == 2
    feats = m.forward_head(m.forward_features(x), pre_logits=True)
    torch.testing.assert_close(feats, m.fc_norm(m.forward_features(x)[:, 1:].mean(1)))
    assert m(x).shape == (2, 5)
    cls = tiny(num_classes=5, use_mean_pooling=False)
    assert isinstance(cls.norm, torch.nn.LayerNorm) and isinstance(cls.fc_norm, torch.nn.Identity)
    torch.testing.assert_close(cls(x), cls.head(cls.forward_features(x)[:, 0]))


def test_grid_head_reads_the_layout():
    m = tiny(img_size=(32, 48), num_classes=5, head_grid=2)  # 4x6 patches of width 32, 2x2 cells
    assert m.head.in_features == 32 * 4
    x = torch.randn(2, 3, 32, 48)
    tokens = m.forward_features(x)
    feats = m.forward_head(tokens, pre_logits=True)  # (B, D*2*2): channel-major cells, as a pooled conv map
    normed = m.fc_norm(tokens[:, 1:]).reshape(2, 4, 6, 32)  # (B, h, w, D), LayerNorm per token
    torch.testing.assert_close(feats.reshape(2, 32, 2, 2)[:, :, 1, 0], normed[:, 2:, :3].mean(dim=(1, 2)))
    torch.testing.assert_close(m(x), m.head(feats))
    # the same patch tokens in another place: the mean head cannot tell, the grid head can
    moved = torch.cat([tokens[:, :1], tokens[:, 1:].flip(1)], dim=1)
    mean_head = tiny(img_size=(32, 48), num_classes=5)
    torch.testing.assert_close(mean_head.forward_head(moved), mean_head.forward_head(tokens))
    assert not torch.allclose(m.forward_head(moved), m.forward_head(tokens))
    with pytest.raises(ConfigError):
        ModelConfig(head_grid=-1)


def test_copy_shared_rel_pos_bias_keeps_outputs():
    m = tiny(use_shared_rel_pos_bias=True, num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    y = m(x)
    m.copy_shared_rel_pos_bias_to_layers()
    assert m.rel_pos_bias is None and m.cfg.use_rel_pos_bias and not m.cfg.use_shared_rel_pos_bias
    assert all(b.attn.relative_position_bias_table is not None for b in m.blocks)
    torch.testing.assert_close(m(x), y)
    names = m.no_weight_decay()
    assert {"cls_token", "blocks.0.attn.relative_position_bias_table"} <= names


def test_init_follows_official_beit():
    torch.manual_seed(0)
    cfg = ModelConfig(img_size=32, patch_size=8, embed_dim=256, depth=4, num_heads=4, num_classes=10,
                      drop_path_rate=0.3, layer_scale_init=0.1)
    m = VisionTransformer(cfg)
    for i, blk in enumerate(m.blocks):
        expected = 0.02 * 0.8796 / math.sqrt(2 * (i + 1))  # std of N(0, 0.02) truncated at 2 std
        assert abs(blk.attn.proj.weight.std().item() / expected - 1) < 0.1
        assert abs(blk.mlp.fc2.weight.std().item() / expected - 1) < 0.1
        assert torch.all(blk.gamma_1 == 0.1)
    assert [round(b.drop_path.p, 4) for b in m.blocks] == [0.0, 0.1, 0.2, 0.3]
    assert m.head.weight.std().item() < 0.02 * 0.001 * 1.3
    assert all(b.attn.qkv.bias is None for b in m.blocks)
    assert torch.all(m.rel_pos_bias.relative_position_bias_table == 0)
    no_ls = VisionTransformer(ModelConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                          layer_scale_init=0.0))
    assert no_ls.blocks[0].gamma_1 is None
    assert "blocks.0.gamma_1" not in no_ls.state_dict()


def test_sincos_position_embedding_is_fixed():
    m = tiny(use_sincos_pos_emb=True, use_shared_rel_pos_bias=False)
    assert "pos_embed" in m.state_dict() and "pos_embed" not in dict(m.named_parameters())
    assert torch.all(m.pos_embed[0, 0] == 0)
    assert m.pos_embed.shape == (1, 17, 32) and m.pos_embed.abs().max() <= 1


def test_mask_without_mask_token_is_an_error():
    m = tiny()
    with pytest.raises(ValueError, match="MASK"):
        m.forward_features(torch.randn(1, 3, 32, 32), torch.zeros(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="32"):
        m.forward_features(torch.randn(1, 3, 64, 64))


def test_bf16_autocast_trains():
    m = tiny(vocab_size=16, use_rel_pos_bias=True).train()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 16) < 0.5
    mask[:, 0] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(x, mask)
    logits.float().logsumexp(-1).mean().backward()
    assert m.blocks[0].attn.relative_position_bias_table.grad.abs().sum() > 0
    assert m.mask_token.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="out of range"):
        m.get_intermediate_layers(x, 5)
