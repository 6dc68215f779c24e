"""The backbone runs images of another size (``forward_features(x, any_size=True)``, iBOT's local crops):
its absolute position table resized bicubically to the new grid, everything else unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from beit.config import ConfigError, ModelConfig
from beit.models.vit import VisionTransformer

ABS = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, use_abs_pos_emb=True,
           use_rel_pos_bias=False, use_shared_rel_pos_bias=False, layer_scale_init=0.0)


def test_other_size_equals_a_model_built_for_it_with_the_resized_table():
    torch.manual_seed(0)
    model = VisionTransformer(ModelConfig(**ABS)).eval()
    with torch.no_grad():
        model.pos_embed.normal_()
    x = torch.randn(2, 3, 8, 12)  # a 2x3 grid instead of 4x4
    out = model.forward_features(x, any_size=True)

    small = VisionTransformer(ModelConfig(**{**ABS, "img_size": (8, 12)})).eval()
    sd = model.state_dict()
    table = sd["pos_embed"][:, 1:].reshape(1, 4, 4, 16).permute(0, 3, 1, 2)  # (1, D, 4, 4)
    table = F.interpolate(table, size=(2, 3), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    sd["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], table.reshape(1, 6, 16)], dim=1)
    small.load_state_dict(sd)
    torch.testing.assert_close(out, small.forward_features(x), rtol=0, atol=0)


def test_own_size_is_unchanged_and_other_sizes_need_the_flag():
    model = VisionTransformer(ModelConfig(**ABS)).eval()
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(model.forward_features(x, any_size=True), model.forward_features(x))
    with pytest.raises(ValueError, match="expected images"):
        model.forward_features(torch.randn(1, 3, 8, 8))


def test_relative_positions_are_refused():
    rel = VisionTransformer(ModelConfig(**{**ABS, "use_rel_pos_bias": True}))
    with pytest.raises(ConfigError, match="absolute positions"):
        rel.forward_features(torch.randn(1, 3, 8, 8), any_size=True)
