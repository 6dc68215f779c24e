"""The attention kernels of models/vit.py: FlexAttention's score modifier adds the relative position bias
exactly as SDPA's additive mask does (forward on CPU here; forward + gradients in bf16 on CUDA in
tests/gpu/test_cuda.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from beit.models import vit


@pytest.mark.parametrize("bias_batch", [1, 2])  # shared bias (BEiT) and per-sample bias (MAE's visible subset)
def test_flex_score_mod_adds_the_bias_like_sdpa(bias_batch):
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    g = torch.Generator().manual_seed(0)
    B, H, T, hd = 2, 3, 17, 16
    q, k, v = (torch.randn(B, H, T, hd, generator=g) for _ in range(3))
    bias = torch.randn(bias_batch, H, T, T, generator=g)
    with torch.no_grad():  # FlexAttention has no CPU backward; eager mode runs its reference path here
        out = vit._flex_with_bias(fa.flex_attention, q, k, v, bias)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() > 1e-2  # the bias mattered


def test_cpu_attention_is_sdpa_with_gradients():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 3, 9, 9, generator=g, requires_grad=True)
    out = vit.attention(q, k, v, bias)
    logits = q @ k.transpose(-2, -1) / 8**0.5 + bias
    ref = logits.softmax(-1) @ v
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    gb, = torch.autograd.grad(out.square().sum(), bias)
    gb_ref, = torch.autograd.grad(ref.square().sum(), bias)
    torch.testing.assert_close(gb, gb_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
def test_explicit_cpu_attention_equals_sdpa_with_gradients(with_bias):
    """The written-out formula the backbone uses on CPU (bf16, or with a bias) is SDPA's computation:
    outputs and the gradients of q, k, v and the bias agree in fp32."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 3, 17, 17, generator=g, requires_grad=True) if with_bias else None
    ours = vit._explicit_attention(q, k, v, bias)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    leaves = [q, k, v] + ([bias] if with_bias else [])
    g_ours = torch.autograd.grad(ours.square().sum(), leaves)
    g_ref = torch.autograd.grad(ref.square().sum(), leaves)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
