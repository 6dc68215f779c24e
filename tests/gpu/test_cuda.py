"""CUDA-only checks (marker ``cuda``; skipped without a GPU, run by ``scripts/gpu_check.sh``).

The default attention with the relative position bias runs fused (SDPA's memory-efficient kernel, bias
gradient included); FlexAttention (opt-in) against SDPA, forward and gradients; bf16 and fp16 (with the
gradient scaler) training steps; ``train.precision=auto`` on CUDA.

bf16 comparisons follow PyTorch's own FlexAttention tests: both kernels are compared with a float64
computation from the same (bf16) inputs, and FlexAttention must be as exact as SDPA to within 1e-3
(relative L2 error); two bf16 kernels cannot agree elementwise beyond bf16's own rounding (2^-8).
"""

from __future__ import annotations

import json

import pytest
import torch

from beit import precision
from beit.models import vit
from bench import attention_kernels as ak  # the inputs, float64 reference and errors of the kernel benchmark

pytestmark = pytest.mark.cuda
DEV = "cuda"
NAMES, rel_err = ak.NAMES, ak.rel_err


def inputs(dtype, bias_batch: int):
    """q, k, v, an fp32 bias (as the learned table) and an output gradient: batch 4, 6 heads, 197 tokens."""
    return ak.inputs(DEV, dtype, bias_batch, B=4, H=6, T=197, hd=64)


def run_kernel(kind: str, *args):
    """Output and gradients of q, k, v, bias; ``gold``: the formula in float64 from the same values."""
    if kind == "gold":
        return ak.forward_backward(ak.gold, *args, cast="double")
    return ak.forward_backward(ak.kernels(DEV)[kind], *args)


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("bias_batch", [1, 4])
def test_default_attention_with_a_learned_bias_runs_fused(bias_batch):
    """With only the memory-efficient backend allowed, the backbone's attention (bias with gradient) still runs,
    so PyTorch need not fall back to materialising the attention matrix; and it is bf16-exact."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args = inputs(torch.bfloat16, bias_batch)
    gold = run_kernel("gold", *args)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        got = ak.forward_backward(vit.attention, *args)
    errs = {n: rel_err(a, g) for n, a, g in zip(NAMES, got, gold)}
    print("bf16 fused SDPA vs float64, relative L2:", json.dumps(errs))
    assert max(errs.values()) < 5e-3, errs  # bf16 rounds at 2^-8 = 3.9e-3 per element; L2 errors land ~2-3e-3


def test_flex_is_available_on_this_torch():
    assert vit._compiled_flex() is not None, f"torch {torch.__version__}: no FlexAttention (needs >= 2.7)"


@pytest.mark.parametrize("bias_batch", [1, 4])
def test_flex_equals_sdpa_fp32_with_gradients(bias_batch):
    args = inputs(torch.float32, bias_batch)
    flex, sdpa = run_kernel("flex", *args), run_kernel("sdpa", *args)
    errs = {n: rel_err(a, b) for n, a, b in zip(NAMES, flex, sdpa)}
    print("fp32 flex vs sdpa, relative L2:", json.dumps(errs))
    assert max(errs.values()) < 1e-4, errs


@pytest.mark.parametrize("bias_batch", [1, 4])
def test_flex_equals_sdpa_bf16_with_gradients(bias_batch):
    args = inputs(torch.bfloat16, bias_batch)
    flex, sdpa, gold = (run_kernel(k, *args) for k in ("flex", "sdpa", "gold"))
    report = {n: {"flex": rel_err(f, g), "sdpa": rel_err(s, g), "flex_vs_sdpa": rel_err(f, s)}
              for n, f, s, g in zip(NAMES, flex, sdpa, gold)}
    print("bf16 relative L2 errors against float64:", json.dumps(report))
    for n, r in report.items():
        assert r["flex"] <= r["sdpa"] + 1e-3, (n, r)


def test_model_uses_flex_and_matches_sdpa(monkeypatch):
    from beit.models.presets import create_model

    torch.manual_seed(0)
    # no stochastic depth: with it (the preset's 0.1) the two passes below would drop different paths
    model = create_model("beit_base_patch16_224", depth=2, drop_path_rate=0.0).to(DEV)
    with torch.no_grad():  # a non-zero table, so the bias matters
        model.rel_pos_bias.relative_position_bias_table.normal_(0, 0.5)
    x = torch.randn(4, 3, 224, 224, device=DEV)
    calls = []
    real = vit._flex_with_bias
    monkeypatch.setattr(vit, "_flex_with_bias", lambda *a: calls.append(1) or real(*a))

    def loss_and_grad(use_flex: bool):
        monkeypatch.setattr(vit, "USE_FLEX", use_flex)
        model.zero_grad(set_to_none=True)
        loss = model.forward_features(x).float().square().mean()
        loss.backward()
        return loss.detach(), model.rel_pos_bias.relative_position_bias_table.grad.clone()

    lf, gf = loss_and_grad(True)
    assert calls, "FlexAttention was not used on CUDA"
    n = len(calls)
    ls, gs = loss_and_grad(False)
    assert len(calls) == n
    assert rel_err(lf, ls) < 1e-4 and rel_err(gf, gs) < 1e-4, (rel_err(lf, ls), rel_err(gf, gs))


def test_auto_precision_on_cuda():
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert precision.resolve("auto", DEV).precision == expected


@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_pretraining_steps_in_half_precision(tmp_path, make_image_folder, prec):
    """BEiT (relative position bias) trains a few steps; fp16 goes through the scaler."""
    from beit import checkpoint as ckpt
    from beit.cli import main
    from beit.loading import read_checkpoint

    data = make_image_folder(classes=(), per_class=32)
    out = tmp_path / "run"
    rc = main(["pretrain", "--data", str(data), "--out", str(out), "--preset", "beit_tiny_patch4_32",
               "--steps", "6", "--batch-size", "16", "--precision", prec, "--device", "cuda", "--workers", "0",
               "beit.target=pixels", "train.log_every=1", "train.ckpt_every=3"])
    assert rc == 0
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert {r["precision"] for r in rows if "loss" in r} == {prec}
    _, state, tensors = read_checkpoint(ckpt.latest_checkpoint(out))
    assert int(state["step"]) == 6


def _beit_with_tokenizer(**beit):
    from beit.config import ModelConfig, from_dict
    from beit.methods import BEiTConfig, BEiTMethod
    from beit.models.tokenizer import Tokenizer, get_tokenizer_preset

    torch.manual_seed(0)
    tok = Tokenizer(get_tokenizer_preset("dvae_32")).eval()
    model = from_dict(ModelConfig, dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                                        drop_path_rate=0.0))
    return BEiTMethod.build(model, tok, BEiTConfig(min_block=4, **beit)).to(DEV)


def test_tokenizer_overlap_gives_the_serial_ids_and_losses(synthetic_images):
    """beit.tokenizer_overlap: the encode on a side stream while the student's forward runs gives the same ids,
    losses and gradients as the serial encode, over several batches (the side stream really used)."""
    g = torch.Generator().manual_seed(0)
    batches = [{"images": torch.randn(16, 3, 32, 32, generator=g).to(DEV),
                "tok_images": synthetic_images(16, seed=s).to(DEV),
                "mask": (torch.rand(16, 8, 8, generator=g) < 0.4).to(DEV)} for s in range(4)]
    runs = {}
    for overlap in (False, True):
        m = _beit_with_tokenizer(tokenizer_precision="fp32", tokenizer_overlap=overlap)
        out = []
        for b in batches:
            with torch.autocast(DEV, dtype=torch.bfloat16):
                loss, metrics = m(b)
            loss.backward()
            out.append((loss.detach().clone(), metrics["mlm_acc"].clone(), m.model.lm_head.weight.grad.clone()))
            m.zero_grad(set_to_none=True)
        runs[overlap] = out
        assert bool(m._side._streams) == overlap  # the side stream was created (and used) only when asked
    for (l0, a0, g0), (l1, a1, g1) in zip(runs[False], runs[True]):
        torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
        assert torch.equal(a1, a0)  # same ids, same predictions
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)


def test_tokenizer_auto_probes_fp16_on_cuda(synthetic_images):
    """auto on CUDA compares an fp16 encode with fp32 on the first batch and keeps fp16 only above the threshold;
    the ids it returns afterwards are those of the chosen precision."""
    from beit.methods.token_targets import encode_ids

    x = synthetic_images(16, seed=1).to(DEV)
    m = _beit_with_tokenizer(tokenizer_agreement=0.0)
    m.visual_tokens(x)
    assert m.tokenizer_choice.name == "fp16" and 0.0 <= m.tokenizer_choice.agreement <= 1.0
    assert torch.equal(m.visual_tokens(x), encode_ids(m.tokenizer.encode, x, torch.float16).flatten(1))
    strict = _beit_with_tokenizer(tokenizer_agreement=1.0)
    strict.visual_tokens(x)
    assert strict.tokenizer_choice.name == ("fp16" if strict.tokenizer_choice.agreement == 1.0 else "fp32")
