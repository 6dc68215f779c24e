"""``beit show attention`` and ``beit show mim``: the numbers behind the pictures, and the commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from beit.config import ModelConfig, to_dict
from beit.models.tokenizer import Tokenizer, save_tokenizer
from beit.models.tokenizer import TokenizerConfig as DVAEConfig
from beit.models.vit import VisionTransformer
from beit.viz.attention import cls_attention
from beit.viz.mim import mim_predict

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def save_backbone_dir(model: VisionTransformer, path: Path, extra: dict | None = None) -> Path:
    from beit.checkpoint import save_weights_dir

    save_weights_dir(path, {f"model.{k}": v for k, v in model.state_dict().items()}, {"state_prefix": "model."},
                     yaml.safe_dump({"model": to_dict(model.cfg), **(extra or {})}))
    return path


@pytest.fixture
def image_file(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    a = (rng.uniform(0, 1, (20, 24, 3)) * 255).astype(np.uint8)
    a[5:12, 6:14] = (230, 20, 20)
    Image.fromarray(a).save(tmp_path / "img.png")
    return tmp_path / "img.png"


@pytest.fixture
def beit_pair(tmp_path):
    """A BEiT model with an MIM head and a (random) tokenizer of the same 4x4 grid and vocabulary."""
    torch.manual_seed(0)
    tok = Tokenizer(DVAEConfig(img_size=16, vocab_size=32, n_hid=8, n_groups=3, n_init=16))
    model = VisionTransformer(ModelConfig(**TINY, vocab_size=32))
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # spread the logits so predictions are not all one id
    run = save_backbone_dir(model, tmp_path / "run", {"beit": {"min_block": 2, "mask_ratio": 0.5}})
    tok_path = save_tokenizer(tok, tmp_path / "tok")
    return run, tok_path


def test_cls_attention_is_a_distribution_over_patches(image_file):
    torch.manual_seed(0)
    model = VisionTransformer(ModelConfig(**TINY)).eval()
    maps, img = cls_attention(model, image_file, layer=0)
    assert maps.shape == (2, 4, 4) and img.shape == (3, 16, 16)
    assert (maps >= 0).all() and (maps.sum(dim=(1, 2)) <= 1 + 1e-5).all()
    from beit.viz.attention import normalize

    attn = model.get_attention(normalize(img)[None], 0)  # (1, heads, 17, 17), rows sum to 1
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 2, 17))
    torch.testing.assert_close(maps, attn[0, :, 0, 1:].reshape(2, 4, 4))


def test_show_attention_cli(tmp_path, image_file, capsys):
    from beit.cli import main

    torch.manual_seed(0)
    ck = save_backbone_dir(VisionTransformer(ModelConfig(**TINY)), tmp_path / "ck")
    out = tmp_path / "pics" / "att.png"
    assert main(["-q", "show", "attention", "--json", "--init", str(ck), "--image", str(image_file), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    assert Image.open(out).size[0] > 100


def test_mim_predict_keeps_true_ids_outside_the_mask(beit_pair, image_file):
    run, tok_path = beit_pair
    r = mim_predict(run, tok_path, image_file, seed=3)
    mask, true, pred = r["mask"], r["true_ids"], r["pred_ids"]
    assert mask.shape == (4, 4) and mask.dtype == torch.bool and 0 < int(mask.sum()) <= 8  # the run's 50%
    assert torch.equal(pred[~mask], true[~mask])
    assert r["decoded_pred"].shape == r["decoded_true"].shape == (3, 16, 16)
    assert r["num_masked"] == int(mask.sum()) and 0.0 <= r["accuracy"] <= 1.0
    # same seed, same mask; another seed, (almost surely) another mask
    assert torch.equal(mim_predict(run, tok_path, image_file, seed=3)["mask"], mask)


def test_show_mim_cli(tmp_path, beit_pair, image_file, capsys):
    from beit.cli import main

    run, tok_path = beit_pair
    out = tmp_path / "mim.png"
    rc = main(["-q", "show", "mim", "--json", "--init", str(run), "--tokenizer", str(tok_path), "--image", str(image_file),
               "--out", str(out), "--seed", "1"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["out"] == str(out) and res["num_masked"] > 0 and out.is_file()


def test_show_mim_needs_an_mim_head(tmp_path, beit_pair, image_file, capsys):
    from beit.cli import main

    _, tok_path = beit_pair
    ck = save_backbone_dir(VisionTransformer(ModelConfig(**TINY)), tmp_path / "plain")
    rc = main(["-q", "show", "mim", "--init", str(ck), "--tokenizer", str(tok_path), "--image", str(image_file),
               "--out", str(tmp_path / "x.png")])
    assert rc == 2
    assert "masked-image-modeling head" in capsys.readouterr().err
