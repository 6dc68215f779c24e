"""The demo report's text is derived from the runs' configs, not written for one setting."""

from __future__ import annotations

from beit.config import to_dict
from beit.demo.report import method_name, pretraining_text, tokenizer_text
from beit.models.tokenizer import get_tokenizer_preset
from beit.tasks import pretrain


def test_tokenizer_text_follows_the_quantizer_and_grid():
    vq = tokenizer_text({"model": to_dict(get_tokenizer_preset("vq_32"))})
    gumbel = tokenizer_text({"model": to_dict(get_tokenizer_preset("dalle_112"))})
    assert vq.startswith("A VQ-VAE") and "Gumbel" not in vq
    assert gumbel.startswith("A discrete VAE") and "Gumbel-softmax" in gumbel
    cfg = get_tokenizer_preset("dalle_112")  # 112 px, 14x14 tokens: 8x8 pixels per token
    assert f"every 8x8 patch of a {cfg.img_size} px image with one of {cfg.vocab_size} visual words" in gumbel


def test_pretraining_text_follows_the_method_and_masking():
    beit = pretraining_text(to_dict(pretrain.build_config("beit_tiny_patch4_32")))
    assert beit.startswith("BEiT pretraining: 26 of the 64 patches are masked uniformly")  # round(0.4 * 8 * 8)
    block = pretraining_text(to_dict(pretrain.build_config("beit_tiny_patch4_32", None, ["beit.masking=block",
                                                                                        "beit.num_masked=10"])))
    assert "10 of the 64 patches are masked in blocks" in block
    mae = pretraining_text(to_dict(pretrain.build_config("mae_tiny_patch4_32")))
    assert mae.startswith("MAE pretraining: 75% of the patches are masked") and "visible patches" in mae
    assert method_name("ibot") == "iBOT" and method_name("new") == "NEW"
