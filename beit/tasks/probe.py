"""Frozen-backbone probes: linear classification and weighted k-nearest neighbours, per layer.

``beit probe linear|knn --data DIR --init CKPT`` measures how linearly separable (or how well clustered)
the features of each block are, without training the backbone:

- features are extracted **once**, without gradients, in batches, for every requested block and pooling
  (``mean`` of the patch tokens, or the ``cls`` token) on ``DIR/train`` and ``DIR/val``;
- ``linear``: BatchNorm1d without affine parameters + a linear layer on the cached features (as MAE's
  ``main_linprobe.py``), trained with AdamW and a cosine schedule; every
  (layer, pooling) pair gets its own head, all trained in one loop since they are independent;
- ``knn``: cosine similarity on L2-normalised features, the ``k`` = 20 nearest training samples vote with
  weights ``exp(sim / T)``, ``T`` = 0.07 (DINO, arXiv 2104.14294, ``eval_knn.py``).

The result is JSON: accuracy per (layer, pooling) and the best pair. Layers are 0-based block indices
(``-1`` is the last block); a block's output is taken before the final LayerNorm.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..config import ConfigError, resolve
from ..models.vit import VisionTransformer
from .augment import AugConfig, build_eval_transform
from .finetune import FinetuneDataConfig, labelled_splits, topk_correct

log = logging.getLogger("beit")

__all__ = ["ProbeConfig", "extract_features", "knn_predict", "linear_probe", "parse_layers", "run"]


@dataclass
class ProbeConfig:
    protocol: str = "linear"  # linear | knn
    init: str = ""  # backbone: anything beit.load reads
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    layers: str = "all"  # "all" | comma-separated 0-based block indices, negative from the end
    pool: str = "mean"  # mean | cls | both
    img_size: int = 0  # 0: the checkpoint's resolution
    crop_pct: float = 1.0  # resize to img_size / crop_pct, then center crop
    batch_size: int = 128  # feature extraction
    num_workers: int = 2  # data loading processes for feature extraction
    # linear
    steps: int = 500
    lr: float = 1e-3
    weight_decay: float = 0.0
    linear_batch_size: int = 256
    # knn
    k: int = 20
    temperature: float = 0.07
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.protocol not in ("linear", "knn"):
            raise ConfigError(f"protocol must be linear or knn, got {self.protocol!r}")
        if self.pool not in ("mean", "cls", "both"):
            raise ConfigError(f"pool must be mean, cls or both, got {self.pool!r}")
        if self.k < 1 or self.temperature <= 0 or self.steps < 1:
            raise ConfigError("probe: k and steps must be >= 1 and temperature > 0")


def build_config(config: str | None = None, overrides: list[str] | dict | None = None) -> ProbeConfig:
    return resolve(ProbeConfig, None, None, config, overrides)


def parse_layers(spec: str, depth: int) -> list[int]:
    """``"all"`` -> ``[0 .. depth-1]``; ``"3,-1"`` -> ``[3, depth-1]`` (sorted, unique, 0-based)."""
    spec = str(spec).strip()
    if spec == "all":
        return list(range(depth))
    try:
        raw = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--layers must be 'all' or comma-separated integers, got {spec!r}") from None
    if not raw or any(not -depth <= i < depth for i in raw):
        raise ConfigError(f"--layers {spec!r}: block indices must lie in [{-depth}, {depth - 1}] for depth {depth}")
    return sorted({i % depth for i in raw})


def _pools(pool: str) -> list[str]:
    return ["mean", "cls"] if pool == "both" else [pool]


@torch.no_grad()
def extract_features(model: VisionTransformer, dataset, layers: list[int], pools: list[str], *,
                     batch_size: int = 128, device: str | torch.device = "cpu",
                     num_workers: int = 0) -> tuple[dict[tuple[int, str], torch.Tensor], torch.Tensor]:
    """One pass over ``dataset`` (``(image, label)`` items): ``{(layer, pool): (N, D)}`` float32 features and
    the ``(N,)`` labels. ``mean``: average of the patch tokens; ``cls``: the [CLS] token."""
    model.eval().to(device)
    feats: dict[tuple[int, str], list[torch.Tensor]] = {(i, p): [] for i in layers for p in pools}
    labels = []
    for images, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        outs = model.get_intermediate_layers(images.to(device), layers)  # list of (B, 1+N, D), sorted layers
        for i, tokens in zip(layers, outs):
            for p in pools:
                f = tokens[:, 1:].mean(dim=1) if p == "mean" else tokens[:, 0]  # (B, D)
                feats[(i, p)].append(f.float().cpu())
        labels.append(y)
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels).long()


def linear_probe(train_feats: dict, train_labels: torch.Tensor, val_feats: dict, val_labels: torch.Tensor,
                 num_classes: int, *, steps: int = 500, lr: float = 1e-3, weight_decay: float = 0.0,
                 batch_size: int = 256, seed: int = 0,
                 device: str | torch.device = "cpu") -> dict[tuple, dict[str, float]]:
    """Train ``BatchNorm1d(affine=False) + Linear`` on each cached feature set; ``{key: {"top1", "top5"}}``.

    The heads are independent, so they are trained together (one loss = their sum, AdamW is per-parameter).
    """
    keys = list(train_feats)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    heads = nn.ModuleList(
        nn.Sequential(nn.BatchNorm1d(train_feats[k].shape[1], affine=False), nn.Linear(train_feats[k].shape[1],
                                                                                      num_classes))
        for k in keys).to(device)
    for h in heads:
        nn.init.trunc_normal_(h[1].weight, std=0.01)
        nn.init.zeros_(h[1].bias)
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)
    X = [train_feats[k].to(device) for k in keys]
    y = train_labels.to(device)
    n = len(y)
    bs = min(batch_size, n)
    perm, pos = torch.randperm(n, generator=g), 0
    heads.train()
    for step in range(steps):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + bs].to(device)
        pos += bs
        for grp in opt.param_groups:
            grp["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / steps))
        loss = sum(F.cross_entropy(h(x[idx]), y[idx]) for h, x in zip(heads, X))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    heads.eval()
    out = {}
    with torch.no_grad():
        for k, h in zip(keys, heads):
            logits = h(val_feats[k].to(device))
            c1, c5 = topk_correct(logits, val_labels.to(device), (1, 5))
            out[k] = {"top1": 100.0 * c1 / len(val_labels), "top5": 100.0 * c5 / len(val_labels)}
    return out


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN class scores ``(N_test, C)`` (DINO): cosine similarity of L2-normalised features, the
    ``k`` most similar training samples vote for their class with weight ``exp(sim / T)``."""
    train = F.normalize(train_feats.float(), dim=1)  # (N, D)
    test = F.normalize(test_feats.float(), dim=1)  # (M, D)
    k = min(k, train.shape[0])
    scores = []
    for q in test.split(chunk):
        sim, idx = (q @ train.t()).topk(k, dim=1)  # (b, k)
        votes = F.one_hot(train_labels[idx], num_classes).float()  # (b, k, C)
        scores.append((votes * (sim / temperature).exp().unsqueeze(-1)).sum(dim=1))  # (b, C)
    return torch.cat(scores)


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def run(cfg: ProbeConfig, out: str | Path | None = None) -> dict:
    """Probe as ``cfg`` says; returns (and writes to ``out`` if given) the JSON-able result."""
    from .. import api

    if not cfg.init:
        raise ConfigError("give the backbone: --init CKPT")
    torch.manual_seed(cfg.seed)
    overrides = {"img_size": cfg.img_size} if cfg.img_size else {}
    model = api.load(cfg.init, **overrides)
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"--init {cfg.init}: not a vision transformer checkpoint (a tokenizer?)")
    size = model.cfg.img_size
    tf = build_eval_transform(AugConfig(eval_crop_pct=cfg.crop_pct), size)
    tr, va = labelled_splits(cfg.data.path, tf, tf, labels_per_class=cfg.data.labels_per_class,
                             label_fraction=cfg.data.label_fraction, seed=cfg.seed)
    layers = parse_layers(cfg.layers, model.num_layers)
    pools = _pools(cfg.pool)
    device = _device(cfg.device)
    log.info("probe %s: %d train / %d val images, %d classes, blocks %s, pooling %s", cfg.protocol, len(tr),
             len(va), len(tr.classes), layers, "/".join(pools))
    ftr, ytr = extract_features(model, tr, layers, pools, batch_size=cfg.batch_size, device=device,
                                num_workers=cfg.num_workers)
    fva, yva = extract_features(model, va, layers, pools, batch_size=cfg.batch_size, device=device,
                                num_workers=cfg.num_workers)
    C = len(tr.classes)
    if cfg.protocol == "linear":
        res = linear_probe(ftr, ytr, fva, yva, C, steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                           batch_size=cfg.linear_batch_size, seed=cfg.seed, device=device)
    else:
        res = {}
        for key in ftr:
            scores = knn_predict(ftr[key], ytr, fva[key], C, cfg.k, cfg.temperature)
            c1, c5 = topk_correct(scores, yva, (1, 5))
            res[key] = {"top1": 100.0 * c1 / len(yva), "top5": 100.0 * c5 / len(yva)}
    per_layer = [{"layer": layer, "pool": pool, **{m: round(v, 4) for m, v in res[(layer, pool)].items()}}
                 for layer, pool in sorted(res)]
    best = max(per_layer, key=lambda r: (r["top1"], r["layer"]))
    result = {"protocol": cfg.protocol, "init": str(cfg.init), "num_classes": C, "num_train": len(tr),
              "num_val": len(va), "best": best, "per_layer": per_layer,
              "config": dataclasses.asdict(cfg)}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result
