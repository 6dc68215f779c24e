"""Interop against the libraries themselves: same random weights, fp32, max |diff| <= 1e-4.

Import = their model -> files -> ``load_any`` -> ours; export = ours -> ``export_*`` -> their own loader.
"""

from __future__ import annotations

import json

import pytest
import torch

from beit.checkpoint_io import CheckpointError, save_weights
from beit.config import ConfigError, ModelConfig
from beit.exporting import export_hf, export_model
from beit.interop import (
    infer_config,
    model_metadata,
    ours_to_timm,
    timm_model_args,
    timm_to_ours,
)
from beit.loading import build_and_load, load_any
from beit.models import VisionTransformer, create_model
from beit.models.positions import resize_pos_and_rel_tables

ATOL = 1e-4


@torch.no_grad()
def jitter(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter so zero-initialised tables, tokens and LayerScale all matter."""
    torch.manual_seed(1)
    for p in model.parameters():
        p.add_(torch.randn_like(p) * scale)
    return model.eval()


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------------- HF transformers


def hf_config(transformers, **kw):
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                image_size=32, patch_size=8, drop_path_rate=0.0, layer_norm_eps=1e-12)
    base.update(kw)
    return transformers.BeitConfig(**base)


def test_hf_classification_import_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = hf_config(transformers, num_labels=7, use_relative_position_bias=True,
                    use_absolute_position_embeddings=True)
    theirs = jitter(transformers.BeitForImageClassification(cfg))
    theirs.save_pretrained(tmp_path / "hf")
    kind, ours = load_any(tmp_path / "hf")
    assert kind == "hf" and ours.cfg.num_classes == 7 and ours.cfg.use_rel_pos_bias
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = theirs(pixel_values=x).logits
        assert maxdiff(ours(x.clone()), ref) <= ATOL
    # export: ours (mean pooling with fc_norm, per-layer tables, abs pos) -> HF's own loader
    export_hf(jitter(ours), tmp_path / "out")
    back = transformers.BeitForImageClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert maxdiff(back(pixel_values=x).logits, ours(x)) <= ATOL


def test_hf_cls_pooling_import_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = hf_config(transformers, num_labels=3, use_mean_pooling=False, use_shared_relative_position_bias=True,
                    layer_scale_init_value=0.0)
    theirs = jitter(transformers.BeitForImageClassification(cfg))
    theirs.save_pretrained(tmp_path / "hf")
    _, ours = load_any(tmp_path / "hf")
    assert not ours.cfg.use_mean_pooling and ours.blocks[0].gamma_1 is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert maxdiff(ours(x), theirs(pixel_values=x).logits) <= ATOL
    export_model(ours, tmp_path / "out", "hf")
    back = transformers.BeitForImageClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert maxdiff(back(pixel_values=x).logits, ours(x)) <= ATOL


def test_hf_masked_image_modeling_import_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = hf_config(transformers, vocab_size=40, use_mask_token=True, use_shared_relative_position_bias=True)
    theirs = jitter(transformers.BeitForMaskedImageModeling(cfg))
    theirs.save_pretrained(tmp_path / "hf")
    kind, ours = load_any(tmp_path / "hf")
    assert ours.cfg.vocab_size == 40 and ours.rel_pos_bias is not None
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 16) < 0.5
    mask[0, 0] = True
    with torch.no_grad():
        ref = theirs(pixel_values=x, bool_masked_pos=mask).logits[mask]  # HF: every position, then select
        assert maxdiff(ours.forward_mim(x, mask), ref) <= ATOL
    # export a model of ours that starts from our own init (shared table, LayerScale)
    mine = jitter(create_model("beit_tiny_patch4_32", depth=2, vocab_size=40, patch_size=8))
    export_hf(mine, tmp_path / "out")
    back = transformers.BeitForMaskedImageModeling.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        ref = back(pixel_values=x, bool_masked_pos=mask).logits[mask]
        assert maxdiff(mine.forward_mim(x, mask), ref) <= ATOL


def test_hf_base_model_export_and_v5_names(tmp_path):
    transformers = pytest.importorskip("transformers")
    mine = jitter(VisionTransformer(ModelConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                                use_sincos_pos_emb=True, use_shared_rel_pos_bias=False,
                                                use_rel_pos_bias=True)))
    export_hf(mine, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["BeitModel"]
    back = transformers.BeitModel.from_pretrained(tmp_path / "out").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert maxdiff(back(pixel_values=x).last_hidden_state, mine.forward_features(x)) <= ATOL
    # the v5 in-memory names (beit.layers.{i}.attention.q_proj ...) map as well
    from beit.interop import hf_config_to_model_config, hf_to_ours

    cfg = hf_config_to_model_config(back.config.to_dict(), "BeitModel")
    sd = hf_to_ours(back.state_dict(), cfg)
    for k, v in mine.state_dict().items():
        if k != "pos_embed":
            torch.testing.assert_close(sd[k], v, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- timm


@pytest.mark.slow
def test_timm_base_224_import_export():
    """timm's beit_base_patch16_224 (per-layer tables, LayerScale, mean pooling + fc_norm), in memory and
    batch 1 to stay fast: the file round trip and building timm from our arguments are covered by the
    small config below."""
    timm = pytest.importorskip("timm")
    theirs = jitter(timm.create_model("beit_base_patch16_224", pretrained=False), scale=0.02)
    sd = timm_to_ours(theirs.state_dict())
    ours = build_and_load(infer_config(sd), sd)
    assert ours.cfg.num_classes == 1000 and ours.cfg.use_rel_pos_bias and not ours.training
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert maxdiff(ours(x), theirs(x)) <= ATOL
    # export: other weights of ours under timm names, strictly into timm's model; our arguments are the preset's
    args = timm_model_args(ours.cfg)
    assert {k: args[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "use_abs_pos_emb",
                                 "use_rel_pos_bias", "use_shared_rel_pos_bias", "init_values")} == dict(
        patch_size=16, embed_dim=768, depth=12, num_heads=12, use_abs_pos_emb=False, use_rel_pos_bias=True,
        use_shared_rel_pos_bias=False, init_values=pytest.approx(0.1, rel=0.5))
    jitter(ours, scale=0.01)
    theirs.load_state_dict(ours_to_timm(ours.state_dict()), strict=True)
    with torch.no_grad():
        assert maxdiff(theirs(x), ours(x)) <= ATOL


def test_timm_small_config_import_export(tmp_path):
    timm = pytest.importorskip("timm")
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5,
                global_pool="token", use_abs_pos_emb=True, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                init_values=0.1)
    theirs = jitter(timm.create_model("beit_base_patch16_224", pretrained=False, **args))
    from safetensors.torch import save_file

    save_file(theirs.state_dict(), str(tmp_path / "timm.safetensors"))
    kind, ours = load_any(tmp_path / "timm.safetensors", use_mean_pooling=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert maxdiff(ours(x), theirs(x)) <= ATOL
    # ours with mean pooling + fc_norm, shared table -> timm via its own local-folder loader
    mine = jitter(create_model("beit_tiny_patch4_32", depth=2, num_classes=4))
    out = export_model(mine, tmp_path / "export", "timm")
    back = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    y = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert maxdiff(back(y), mine(y)) <= ATOL
    kind, again = load_any(out)
    assert kind == "timm"
    with torch.no_grad():
        assert maxdiff(again(y), mine(y)) == 0


# --------------------------------------------------------------------------------------------- official / ours


def _official_pretrain_ckpt(model: VisionTransformer) -> dict:
    sd = dict(model.state_dict())
    sd["rel_pos_bias.relative_position_index"] = model.rel_pos_index.clone()  # persistent in the official code
    return {"model": sd, "epoch": 799}


def test_official_pretraining_checkpoint_to_finetuning(tmp_path):
    mim = jitter(create_model("beit_tiny_patch4_32", depth=2, vocab_size=30))
    torch.save(_official_pretrain_ckpt(mim), tmp_path / "beit_pt.pth")
    kind, ours = load_any(tmp_path / "beit_pt.pth")
    assert kind == "official" and ours.cfg.vocab_size == 30 and ours.cfg.use_shared_rel_pos_bias
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 64) < 0.4
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_mim(x, mask), mim.forward_mim(x, mask), rtol=0, atol=0)
    # fine-tuning: per-layer copies of the shared table, new classification head, no MIM head
    ft = load_any(tmp_path / "beit_pt.pth", num_classes=10, vocab_size=0, use_mask_token=False,
                  use_shared_rel_pos_bias=False, use_rel_pos_bias=True)[1]
    shared = mim.rel_pos_bias.relative_position_bias_table
    for blk in ft.blocks:
        torch.testing.assert_close(blk.attn.relative_position_bias_table, shared)
    assert ft(x).shape == (2, 10)


def test_beit_safetensors_with_metadata(tmp_path):
    m = jitter(create_model("beit_tiny_patch4_32", depth=2, use_mask_token=True, use_sincos_pos_emb=True))
    save_weights(m.state_dict(), tmp_path / "w.safetensors", model_metadata(m))
    kind, again = load_any(tmp_path / "w.safetensors")
    assert kind == "beit" and again.cfg == m.cfg
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(again.forward_features(x), m.forward_features(x), rtol=0, atol=0)


def test_load_at_another_resolution(tmp_path):
    m = jitter(create_model("beit_tiny_patch4_32", depth=2, num_classes=3, use_abs_pos_emb=True,
                            use_shared_rel_pos_bias=False, use_rel_pos_bias=True))
    sd = m.state_dict()
    same = resize_pos_and_rel_tables(sd, (8, 8))
    assert all(same[k] is sd[k] for k in sd)  # same grid: identity
    save_weights(sd, tmp_path / "w.safetensors", model_metadata(m))
    _, big = load_any(tmp_path / "w.safetensors", img_size=64)
    assert big.pos_embed.shape == (1, 1 + 16 * 16, 192)
    assert big.blocks[0].attn.relative_position_bias_table.shape == ((2 * 16 - 1) ** 2 + 3, 3)
    torch.testing.assert_close(big.blocks[0].attn.relative_position_bias_table[-3:],
                               sd["blocks.0.attn.relative_position_bias_table"][-3:])
    torch.testing.assert_close(big.pos_embed[:, 0], sd["pos_embed"][:, 0])
    assert big(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    # a constant table stays constant; downsizing back to 8x8 from the 16x16 tables works too
    small = resize_pos_and_rel_tables(big.state_dict(), (8, 8))
    assert small["pos_embed"].shape == sd["pos_embed"].shape


def test_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_any(tmp_path / "missing.pth")
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_any(tmp_path / "d")
    m = create_model("beit_tiny_patch4_32", depth=1, num_classes=2)
    with pytest.raises(ConfigError, match="format"):
        export_model(m, tmp_path / "x", "onnx")
    torch.save({"w": torch.ones(1)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="patch_embed"):
        load_any(tmp_path / "x.pth")


def test_grid_head_is_not_exported_but_its_backbone_is(tmp_path):
    import yaml

    from beit.checkpoint import save_weights_dir
    from beit.config import to_dict
    from beit.loading import load

    cfg = ModelConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3, head_grid=2)
    model = VisionTransformer(cfg)
    for fmt in ("hf", "timm"):
        with pytest.raises(ConfigError, match="grid-pooled classifier"):
            export_model(model, tmp_path / fmt, fmt)
    ck = tmp_path / "ck"
    save_weights_dir(ck, {f"model.{k}": v for k, v in model.state_dict().items()}, {"state_prefix": "model."},
                     yaml.safe_dump({"model": to_dict(cfg)}))
    again = load(ck)
    assert again.cfg.head_grid == 2 and again.head.in_features == 32 * 4
    backbone = load(ck, num_classes=0)  # what the error message suggests
    assert export_model(backbone, tmp_path / "hf_backbone", "hf").exists()
