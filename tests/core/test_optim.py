"""The optimiser :func:`beit.optim.build_optimizer` builds: fused AdamW where it can, the same updates."""

from __future__ import annotations

import copy

import torch
from torch import nn

from beit.config import OptimConfig
from beit.optim import build_optimizer, fusable, param_groups


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))


def test_cpu_parameters_get_fused_adamw_with_the_loops_updates():
    cfg = OptimConfig(lr=1e-2, weight_decay=0.05, betas=(0.9, 0.95))
    fused_net, loop_net = _net(), _net()
    fused = build_optimizer(param_groups(fused_net, cfg.weight_decay), cfg)
    assert all(g["fused"] for g in fused.param_groups)
    loop = torch.optim.AdamW(param_groups(loop_net, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             foreach=False)
    x = torch.randn(32, 8)
    for _ in range(5):
        for net, opt in ((fused_net, fused), (loop_net, loop)):
            net(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    moved = sum((a - b).abs().sum() for a, b in zip(fused_net.parameters(), _net().parameters()))
    assert moved > 0.1  # the steps did something
    for a, b in zip(fused_net.parameters(), loop_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_state_survives_a_round_trip_into_a_new_optimizer():
    cfg = OptimConfig(lr=1e-2)
    net = _net()
    opt = build_optimizer(param_groups(net, cfg.weight_decay), cfg)
    net(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    twin = copy.deepcopy(net)
    opt2 = build_optimizer(param_groups(twin, cfg.weight_decay), cfg)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a checkpoint would: its own tensors
    for o, n in ((opt, net), (opt2, twin)):
        n(torch.ones(4, 8)).sum().backward()
        o.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_integer_or_empty_parameter_lists_are_not_fused():
    assert not fusable([])
    assert not fusable([torch.zeros(3, dtype=torch.long)])
    assert fusable([torch.zeros(3)])
