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


def test_verdict_states_margins_and_the_measured_spread():
    from beit.demo import MEASURED_SPREAD, verdict

    summary = {"method": "mae", "minutes": 10.0, "seed": 0,
               "finetune": {"pretrained": {"top1": 80.8}, "scratch": {"top1": 74.2}},
               "pixels": {"knn_ft": {"top1": 72.6}},
               "segment": {"mIoU": 44.3}, "segment_baselines": {"scratch": {"mIoU": 40.0}, "constant": {"mIoU": 6.7}}}
    text = verdict(summary)
    assert text.startswith("Fine-tuned from MAE pretraining, the classifier reaches 80.8% top-1, 6.6 points above")
    assert "8.2 points above k-NN on the raw pixels" in text and "44.3 mIoU against 40.0 from scratch" in text
    width = max(MEASURED_SPREAD["vs_scratch"]) - min(MEASURED_SPREAD["vs_scratch"])
    assert f"+6.6 is larger than the {width:.1f}-point spread of three label draws" in text  # 6.6 > 4.4
    assert "+8.2 is larger than the 4.0-point spread" in text
    below = verdict({**summary, "finetune": {"pretrained": {"top1": 75.0}, "scratch": {"top1": 74.2}}})
    assert "0.8 points above the same recipe from scratch" in below and "+0.8 is within the 4.4-point spread" in below
    other = verdict({**summary, "method": "beit"})
    assert "Fine-tuned from BEiT" in other and "not measured for this setting" in other
    assert verdict({**summary, "pixels": {"knn_ft": {}}}).startswith("No verdict")
