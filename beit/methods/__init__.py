"""Pretraining methods: each is an ``nn.Module`` turning a batch into ``(loss, metrics)`` for the engine."""

from .beit import BEiTConfig, BEiTMethod, build_pretrain_transform

__all__ = ["BEiTConfig", "BEiTMethod", "build_pretrain_transform"]
