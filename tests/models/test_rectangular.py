"""Rectangular images through the stack: config, backbone, position-table resizing (against HF transformers'
interpolation), the segmentation task and transforms, ``beit show attention`` and ``beit segment``.

A square "rectangle" must give exactly what the square path gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from beit.checkpoint_io import save_weights
from beit.config import ConfigError, ModelConfig, apply_overrides, from_dict, to_dict
from beit.data.segmentation import SegTransform
from beit.interop import model_metadata
from beit.loading import build_and_load, load_any
from beit.models.positions import resize_pos_and_rel_tables, resize_pos_embed, resize_rel_table
from beit.models.vit import VisionTransformer, gather_relative_bias, relative_position_index
from beit.tasks.segment import SegHeadConfig, SegmentationTask
from tests.core.test_interop import hf_config, jitter, maxdiff

TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, use_shared_rel_pos_bias=False,
            use_rel_pos_bias=True, use_abs_pos_emb=True)


def test_config_sizes():
    cfg = ModelConfig(img_size=[24, 40], **TINY)
    assert cfg.img_size == (24, 40) and cfg.img_hw == (24, 40) and cfg.grid_size == (3, 5)
    assert cfg.num_patches == 15
    assert ModelConfig(img_size=[32, 32], **TINY).img_size == 32  # a square stays one number
    assert ModelConfig(img_size="24x40", **TINY).img_size == (24, 40)
    assert from_dict(ModelConfig, to_dict(cfg)).img_size == (24, 40)  # YAML round trip (a list on disk)
    assert apply_overrides(ModelConfig(**TINY), ["img_size=[24, 40]"]).grid_size == (3, 5)
    with pytest.raises(ConfigError, match="multiple of model.patch_size"):
        ModelConfig(img_size=[24, 44], **TINY)
    with pytest.raises(ConfigError, match="img_size"):
        apply_overrides(ModelConfig(**TINY), ["img_size=[1, 2, 3]"])


def test_square_rectangle_equals_square_path():
    torch.manual_seed(0)
    square = jitter(VisionTransformer(ModelConfig(img_size=32, **TINY)))
    torch.manual_seed(0)
    rect = jitter(VisionTransformer(ModelConfig(img_size=(32, 32), **TINY)))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(square.forward_features(x), rect.forward_features(x))
    # the generalised resizers reduce to the square ones: an explicit square source grid changes nothing
    sd = square.state_dict()
    assert torch.equal(resize_rel_table(sd["blocks.0.attn.relative_position_bias_table"], (6, 6)),
                       resize_rel_table(sd["blocks.0.attn.relative_position_bias_table"], (6, 6), (4, 4)))
    assert torch.equal(resize_pos_embed(sd["pos_embed"], (6, 6)), resize_pos_embed(sd["pos_embed"], (6, 6), (4, 4)))
    # segmentation transforms: (s, s) draws and produces exactly what s does
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    mask = np.random.default_rng(1).integers(0, 3, (40, 48)).astype(np.uint8)
    for train in (True, False):
        torch.manual_seed(3)
        a = SegTransform(32, train)(img, mask)
        torch.manual_seed(3)
        b = SegTransform((32, 32), train)(img, mask)
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["masks"], b["masks"])


def test_relative_index_of_a_rectangle_by_brute_force():
    h, w = 3, 5
    idx = relative_position_index((h, w))
    nrd = (2 * h - 1) * (2 * w - 1) + 3
    for i in range(h * w):
        for j in range(h * w):
            dy, dx = i // w - j // w, i % w - j % w
            assert idx[1 + i, 1 + j] == (dy + h - 1) * (2 * w - 1) + (dx + w - 1)
    assert idx[0, 1:].eq(nrd - 3).all() and idx[1:, 0].eq(nrd - 2).all() and idx[0, 0] == nrd - 1


def test_non_square_forward_shapes():
    m = VisionTransformer(ModelConfig(img_size=(24, 40), **TINY))
    assert m.grid_size == (3, 5) and m.pos_embed.shape == (1, 16, 32)
    assert m.blocks[0].attn.relative_position_bias_table.shape == (5 * 9 + 3, 2)
    x = torch.randn(2, 3, 24, 40)
    assert m.forward_features(x).shape == (2, 16, 32)
    assert m.get_attention(x).shape == (2, 2, 16, 16)
    assert [t.shape for t in m.get_intermediate_layers(x, 2)] == [(2, 16, 32)] * 2
    with pytest.raises(ValueError, match=r"\(B, C, 24, 40\)"):
        m(torch.randn(1, 3, 40, 24))
    for kind in ("upernet", "pup"):
        task = SegmentationTask(m, 4, SegHeadConfig(kind=kind, channels=8, aux_channels=8, out_indices=[0, 1, 1, 1]))
        out, aux = task.train().logits(x)
        assert out.shape == (2, 4, 24, 40) and (aux is None or aux.shape == out.shape)


def test_resizing_square_to_rectangle_and_back():
    torch.manual_seed(0)
    sq = jitter(VisionTransformer(ModelConfig(img_size=32, **TINY)))  # 4x4 grid
    sd = sq.state_dict()
    rect = resize_pos_and_rel_tables(sd, (3, 5))
    table = sd["blocks.1.attn.relative_position_bias_table"]
    want = F.interpolate(table[:-3].T.reshape(1, 2, 7, 7), size=(5, 9), mode="bicubic", align_corners=False)
    torch.testing.assert_close(rect["blocks.1.attn.relative_position_bias_table"][:-3], want.reshape(2, -1).T)
    assert torch.equal(rect["blocks.1.attn.relative_position_bias_table"][-3:], table[-3:])
    want = F.interpolate(sd["pos_embed"][:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2), size=(3, 5),
                         mode="bicubic", align_corners=False)
    torch.testing.assert_close(rect["pos_embed"][:, 1:], want.permute(0, 2, 3, 1).reshape(1, 15, 32))
    # a rectangular model is loaded at its own size unchanged and resized from its own (non-square) grid
    m = build_and_load(ModelConfig(img_size=(24, 40), **TINY), rect)
    assert torch.equal(m.pos_embed, rect["pos_embed"])
    back = resize_pos_and_rel_tables(m.state_dict(), (4, 4), old_grid=(3, 5))
    assert back["pos_embed"].shape == sd["pos_embed"].shape
    assert back["blocks.0.attn.relative_position_bias_table"].shape == table.shape


def test_load_a_saved_rectangle_at_another_size(tmp_path):
    m = jitter(VisionTransformer(ModelConfig(img_size=(24, 40), **TINY)))
    save_weights(m.state_dict(), tmp_path / "w.safetensors", model_metadata(m))
    kind, same = load_any(tmp_path / "w.safetensors")
    assert kind == "beit" and same.cfg.img_size == (24, 40)
    x = torch.randn(1, 3, 24, 40)
    assert torch.equal(same.forward_features(x), m.forward_features(x))
    _, other = load_any(tmp_path / "w.safetensors", img_size=[40, 24])
    torch.testing.assert_close(other.pos_embed[0, 1:].reshape(5, 3, 32).mean((0, 1)),
                               m.pos_embed[0, 1:].mean(0), atol=0.05, rtol=0)


@pytest.mark.parametrize("shared", [False, True])
def test_rectangle_matches_hf_interpolate_pos_encoding(tmp_path, shared):
    """HF resizes a square model's tables on the fly (``interpolate_pos_encoding=True``): absolute positions
    bicubic, relative tables bilinear. Ours with the same modes must give the same hidden states."""
    transformers = pytest.importorskip("transformers")
    cfg = hf_config(transformers, use_absolute_position_embeddings=True, use_relative_position_bias=not shared,
                    use_shared_relative_position_bias=shared, layer_scale_init_value=0.1, use_mean_pooling=False)
    theirs = jitter(transformers.BeitModel(cfg, add_pooling_layer=False))
    theirs.save_pretrained(tmp_path / "hf")
    _, ours_sq = load_any(tmp_path / "hf")  # 32 px, 4x4 patches
    sd = resize_pos_and_rel_tables(ours_sq.state_dict(), (3, 5), rel_mode="bilinear")
    ours = build_and_load(ModelConfig(**{**to_dict(ours_sq.cfg), "img_size": [24, 40]}), sd)
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        want = theirs(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        got = ours.forward_features(x)
    assert maxdiff(got, want) <= 1e-4
    # the relative bias itself, entry for entry
    if not shared:
        rpb = dict(theirs.named_modules())["layers.0.relative_position_bias"]  # transformers v5 layout
        hf_bias = rpb((3, 5), interpolate_pos_encoding=True, dim_size=16)
        ours_bias = gather_relative_bias(ours.blocks[0].attn.relative_position_bias_table, relative_position_index((3, 5)))
        assert maxdiff(ours_bias, hf_bias) <= 1e-6


def test_timm_export_of_a_rectangle(tmp_path):
    timm = pytest.importorskip("timm")
    from beit.exporting import export_model
    from beit.interop import timm_model_args

    m = jitter(VisionTransformer(ModelConfig(img_size=(24, 40), **{**TINY, "use_abs_pos_emb": False})))
    export_model(m, tmp_path / "t", "timm")
    theirs = timm.create_model("beit_base_patch16_224", pretrained=False, **timm_model_args(m.cfg))
    theirs.load_state_dict(load_any(tmp_path / "t")[1].state_dict(), strict=False)
    x = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        assert maxdiff(theirs.eval().forward_features(x), m.forward_features(x)) <= 1e-4
    with pytest.raises(ConfigError, match="square"):
        export_model(m, tmp_path / "h", "hf")


def test_rectangular_transform_keeps_the_aspect_and_alignment():
    img = np.zeros((60, 80, 3), np.uint8)
    mask = np.zeros((60, 80), np.uint8)
    img[:, 40:], mask[:, 40:] = (220, 30, 30), 1
    for seed in range(6):
        torch.manual_seed(seed)
        out = SegTransform((24, 40), train=seed % 2 == 0, scale=(0.3, 1.0))(Image.fromarray(img), mask)
        assert out["images"].shape == (3, 24, 40) and out["masks"].shape == (24, 40)
        red = out["images"][0] > out["images"][2] + 1.0
        assert (red == (out["masks"] == 1)).float().mean() > 0.9


def test_show_attention_on_a_rectangle(tmp_path, capsys):
    from beit.cli import main
    from beit.viz.attention import cls_attention, prepare_image

    m = VisionTransformer(ModelConfig(img_size=32, **TINY))
    save_weights(m.state_dict(), tmp_path / "w.safetensors", model_metadata(m))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 200, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert prepare_image(tmp_path / "a.png", (24, 40)).shape == (3, 24, 40)
    assert torch.equal(prepare_image(tmp_path / "a.png", (32, 32)), prepare_image(tmp_path / "a.png", 32))
    rect = load_any(tmp_path / "w.safetensors", img_size=[24, 40])[1]
    maps, x01 = cls_attention(rect, tmp_path / "a.png")
    assert maps.shape == (2, 3, 5) and x01.shape == (3, 24, 40)
    assert torch.all(maps.sum((1, 2)) <= 1 + 1e-5)
    rc = main(["-q", "show", "attention", "--json", "--init", str(tmp_path / "w.safetensors"), "--image",
               str(tmp_path / "a.png"), "--out", str(tmp_path / "att.png"), "--img-size", "24x40"])
    assert rc == 0 and (tmp_path / "att.png").is_file()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(tmp_path / "att.png")


def test_pretraining_views_and_mae_on_a_rectangle():
    from beit.data.views import TwoViewTransform
    from beit.methods.mae import MAEConfig, MAEMethod, build_mae_transform

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 200, 3), dtype=np.uint8))
    # a square given as (s, s) draws and produces exactly what s does
    a = TwoViewTransform(32, 16)(img, generator=torch.Generator().manual_seed(5))
    b = TwoViewTransform((32, 32), (16, 16))(img, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    patch, tok = TwoViewTransform((24, 40), (12, 20))(img, generator=torch.Generator().manual_seed(5))
    assert patch.shape == (3, 24, 40) and tok.shape == (3, 12, 20)
    cfg = ModelConfig(img_size=(24, 40), patch_size=8, embed_dim=32, depth=2, num_heads=2, use_sincos_pos_emb=True,
                      use_shared_rel_pos_bias=False, layer_scale_init=0.0)
    mcfg = MAEConfig(decoder_dim=16, decoder_depth=1, decoder_heads=2)
    item = build_mae_transform(mcfg, cfg)(img)
    assert item["images"].shape == (3, 24, 40) and item["noise"].shape == (15,)
    mae = MAEMethod(VisionTransformer(cfg), mcfg)
    batch = {"images": torch.stack([item["images"]] * 2), "noise": torch.stack([item["noise"]] * 2)}
    loss, _ = mae(batch)
    assert torch.isfinite(loss)
    recon, mask = mae.reconstruct(batch["images"], batch["noise"])
    assert recon.shape == (2, 3, 24, 40) and mask.shape == (2, 15)
    from beit.methods.pixels import patchify, unpatchify

    x = torch.randn(2, 3, 24, 40)
    assert torch.equal(unpatchify(patchify(x, 8), 8, 3, (3, 5)), x)
