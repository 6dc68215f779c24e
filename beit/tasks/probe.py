"""Frozen-backbone probes: linear classification and weighted k-nearest neighbours, per layer.

``beit probe linear|knn --data DIR --init CKPT`` measures how linearly separable (or how well clustered)
the features of each block are, without training the backbone:

- features are extracted **once**, without gradients, in batches, for every requested block and pooling
  on ``DIR/train`` and ``DIR/val``: ``mean`` of the patch tokens, the ``cls`` token, or ``grid``: the patch
  tokens average-pooled to a ``grid`` x ``grid`` map and flattened (the spatial-pooling protocol of linear
  probes on convolutional maps, e.g. Zhang et al. 2016, Goyal et al. 2019). A mean over all patches throws
  away the layout, which small centred images (Fashion-MNIST) are mostly told apart by and the raw-pixel
  floor keeps in full (docs/notebook/2026-11-demo.md); ``grid`` keeps a coarse layout at a fixed size;
  ``tokens`` keeps every patch token in its place (``N * width`` features: the whole layout, for small
  models and grids; 6,144 for the demo's 96-wide model on its 8x8 grid, 150k for ViT-B at 224 px);
- ``linear``: BatchNorm1d without affine parameters + a linear layer on the cached features (as MAE's
  ``main_linprobe.py``), trained with AdamW and a cosine schedule; every
  (layer, pooling) pair gets its own head, all trained in one loop since they are independent;
- ``knn``: features centred by the mean of the training features, then cosine similarity on the
  L2-normalised vectors; the ``k`` = 20 nearest training samples vote with weights ``exp(sim / T)``,
  ``T`` = 0.07 (DINO, arXiv 2104.14294, ``eval_knn.py``). Centring matters for features taken before the
  final LayerNorm: their large common component otherwise makes every cosine similarity close to 1.

``--init pixels`` probes the flattened, normalised pixels at the input size instead of a backbone: the
no-learning floor every learned feature must beat (one "layer", 0). ``--init random:CKPT`` probes CKPT's
architecture with fresh random weights (seeded by ``seed``): what the architecture and pooling give without
pretraining, the control that a pretrained backbone's gain is measured against.

The result is JSON: accuracy per (layer, pooling) and the chosen pair (``best``). The pair is chosen on a held-out
part of the training labels (``select_fraction`` of each class, seeded), never on the validation set whose accuracy
is reported: picking the best of 18 pairs on the reported set would report the luckiest of 18 draws. Top-5 is
reported only with more than 5 classes (below that it is 100% or near it by construction). Layers are 0-based block
indices (``-1`` is the last block); a block's output is taken before the final LayerNorm.
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

from ..config import ConfigError, check_fields, resolve
from ..data.folder import SKIP_LIST, DataError, DropUnreadable, ImageFolder, load_image, write_skip_list
from ..data.labelled import balanced_subset, labelled_splits
from ..loading import load
from ..models.vit import VisionTransformer, grid_pool
from .augment import AugConfig, build_eval_transform
from .finetune import FinetuneDataConfig
from .metrics import topk_correct

log = logging.getLogger("beit")

__all__ = ["OnlineKNNProbe", "PixelFeatures", "ProbeConfig", "backbone_of", "extract_features", "knn_predict",
           "linear_probe", "parse_layers", "run"]


@dataclass
class ProbeConfig:
    protocol: str = "linear"  # linear | knn
    init: str = ""  # backbone: anything beit.load reads, "pixels" (flattened normalised pixels) or "random:CKPT"
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    layers: str = "all"  # "all" | comma-separated 0-based block indices, negative from the end
    pool: str = "mean"  # mean | cls | grid | tokens | both (mean, cls) | all (mean, cls, grid), or a comma list
    grid: int = 4  # pool=grid: patch tokens average-pooled to grid x grid cells (grid*grid*width features)
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
    center: bool = True  # kNN: subtract the mean training feature before L2 normalisation
    seed: int = 0
    device: str = "auto"
    # the share of each class's training images held out to choose the (layer, pooling) pair (0: no choice is
    # made on held-out data; the deepest pair of the first pooling is reported as ``best``)
    select_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.protocol not in ("linear", "knn"):
            raise ConfigError(f"protocol must be linear or knn, got {self.protocol!r}")
        pool_names(self.pool)  # raises on an unknown name
        check_fields(self, "probe", {"k steps batch_size linear_batch_size grid": "size", "img_size num_workers": "count",
                                     "temperature lr": "positive", "weight_decay": "nonneg"})
        if not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError(f"probe.crop_pct must be in (0, 1], got {self.crop_pct}")
        if not 0.0 <= self.select_fraction < 1.0:
            raise ConfigError(f"probe.select_fraction must be in [0, 1), got {self.select_fraction}")


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


RANDOM_PREFIX = "random:"  # --init random:CKPT: CKPT's architecture with random weights (the no-pretraining control)
POOLS = {"mean": ["mean"], "cls": ["cls"], "grid": ["grid"], "tokens": ["tokens"], "both": ["mean", "cls"],
         "all": ["mean", "cls", "grid"]}  # "all" leaves out "tokens", whose size grows with the grid


def pool_names(spec: str) -> list[str]:
    """``"all,tokens"`` -> ``["mean", "cls", "grid", "tokens"]``: names and aliases of :data:`POOLS`, comma-separated."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if part not in POOLS:
            raise ConfigError(f"pool must be one of {', '.join(POOLS)} (or a comma-separated list), got {part!r}")
        names += [n for n in POOLS[part] if n not in names]
    return names


class PixelFeatures(nn.Module):
    """The no-learning baseline as a "backbone" of one layer: the normalised image, flattened."""

    num_layers = 1

    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.img_size = img_size

    def pooled(self, images: torch.Tensor, layers: list[int], pools: list[str]) -> dict[tuple[int, str], torch.Tensor]:
        return {(0, p): images.flatten(1) for p in pools}  # (B, C*H*W) whatever the pooling


def pool_tokens(tokens: torch.Tensor, pool: str, grid_hw: tuple[int, int], grid: int = 4) -> torch.Tensor:
    """One pooling of a block's output ``(B, 1+N, D)``: ``mean`` ``(B, D)`` over the patch tokens, ``cls``
    ``(B, D)``, ``grid`` ``(B, D*grid*grid)``: the ``grid_hw`` map of patch tokens average-pooled to
    ``grid`` x ``grid`` cells (adaptive, so any map size works; a map smaller than ``grid`` is repeated),
    or ``tokens`` ``(B, N*D)``: every patch token in row-major order, nothing pooled."""
    if pool == "cls":
        return tokens[:, 0]
    patches = tokens[:, 1:]  # (B, N, D)
    if pool == "tokens":
        return patches.flatten(1)
    return patches.mean(dim=1) if pool == "mean" else grid_pool(patches, grid_hw, grid)


def pooled_features(model: nn.Module, images: torch.Tensor, layers: list[int],
                    pools: list[str], grid: int = 4) -> dict[tuple[int, str], torch.Tensor]:
    """``{(layer, pool): (B, F)}`` for one batch (see :func:`pool_tokens`)."""
    if isinstance(model, PixelFeatures):
        return model.pooled(images, layers, pools)
    outs = model.get_intermediate_layers(images, layers)  # list of (B, 1+N, D), sorted layers
    hw = tuple(model.patch_embed.grid_size)
    return {(i, p): pool_tokens(tokens, p, hw, grid) for i, tokens in zip(layers, outs) for p in pools}


@torch.no_grad()
def extract_features(model: nn.Module, dataset, layers: list[int], pools: list[str], *,
                     batch_size: int = 128, device: str | torch.device = "cpu",
                     num_workers: int = 0, grid: int = 4) -> tuple[dict[tuple[int, str], torch.Tensor], torch.Tensor]:
    """One pass over ``dataset`` (``(image, label)`` items): ``{(layer, pool): (N, D)}`` float32 features and
    the ``(N,)`` labels (see :func:`pooled_features`)."""
    model.eval().to(device)
    feats: dict[tuple[int, str], list[torch.Tensor]] = {(i, p): [] for i in layers for p in pools}
    labels = []
    for images, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                collate_fn=DropUnreadable()):  # an image that fails to decode is left out
        for key, f in pooled_features(model, images.to(device), layers, pools, grid).items():
            feats[key].append(f.float().cpu())
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
            out[k] = accuracies(h(val_feats[k].to(device)), val_labels.to(device), num_classes)
    return out


def accuracies(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """``top1`` in %, and ``top5`` only with more than 5 classes (with 5 or fewer it is 100% by construction)."""
    ks = (1, 5) if num_classes > 5 else (1,)
    return {f"top{k}": 100.0 * c / max(len(labels), 1) for k, c in zip(ks, topk_correct(scores, labels, ks))}


def heldout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(fit, held)`` of a seeded split of the training labels: ``fraction`` of each class held out
    (rounded, at least 1 where the class has 2 or more images; a class of one image stays whole in ``fit``)."""
    g = torch.Generator().manual_seed(seed + 7919)  # not the seed that drew the labelled subset
    fit, held = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if fraction > 0 else 0
        held.append(idx[:n])
        fit.append(idx[n:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024,
                center: bool = False) -> torch.Tensor:
    """Weighted kNN class scores ``(N_test, C)`` (DINO): cosine similarity of L2-normalised features
    (centred by the training mean first if ``center``), the ``k`` most similar training samples vote for
    their class with weight ``exp(sim / T)``."""
    train, test = train_feats.float(), test_feats.float()
    if center:
        mu = train.mean(dim=0, keepdim=True)  # (1, D)
        train, test = train - mu, test - mu
    train = F.normalize(train, dim=1)  # (N, D)
    test = F.normalize(test, dim=1)  # (M, D)
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


def _native_size(path: str | Path) -> int:
    """The shorter side of the first readable training image: the pixel baseline's size when none is given
    (the folder's header checks have already left out special files and decompression bombs)."""
    for p in ImageFolder(Path(path) / "train", with_labels=True).paths:
        img = load_image(p)
        if img is not None:
            return min(img.size)
    raise DataError(f"none of the images under {Path(path) / 'train'} could be read")


def run(cfg: ProbeConfig, out: str | Path | None = None) -> dict:
    """Probe as ``cfg`` says; returns (and writes to ``out`` if given) the JSON-able result."""
    if not cfg.init:
        raise ConfigError("give the backbone: --init CKPT")
    torch.manual_seed(cfg.seed)
    if cfg.init == "pixels":
        model: nn.Module = PixelFeatures(cfg.img_size or _native_size(cfg.data.path))
        size = model.img_size
    else:
        overrides = {"img_size": cfg.img_size} if cfg.img_size else {}
        random_init = cfg.init.startswith(RANDOM_PREFIX)
        model = load(cfg.init.removeprefix(RANDOM_PREFIX), **overrides)
        if not isinstance(model, VisionTransformer):
            raise ConfigError(f"--init {cfg.init}: not a vision transformer checkpoint (a tokenizer?)")
        if random_init:  # the same architecture, freshly initialised (seeded): the probes' "from scratch"
            torch.manual_seed(cfg.seed)
            model = VisionTransformer(model.cfg)
        size = model.cfg.img_size
    tf = build_eval_transform(AugConfig(eval_crop_pct=cfg.crop_pct), size)
    tr, va = labelled_splits(cfg.data.path, tf, tf, labels_per_class=cfg.data.labels_per_class,
                             label_fraction=cfg.data.label_fraction, seed=cfg.seed)
    layers = parse_layers(cfg.layers, model.num_layers)
    pools = pool_names(cfg.pool)
    device = _device(cfg.device)
    log.info("probe %s: %d train / %d val images, %d classes, blocks %s, pooling %s", cfg.protocol, len(tr),
             len(va), len(tr.classes), layers, "/".join(pools))
    kw = {"batch_size": cfg.batch_size, "device": device, "num_workers": cfg.num_workers, "grid": cfg.grid}
    ftr, ytr = extract_features(model, tr, layers, pools, **kw)
    fva, yva = extract_features(model, va, layers, pools, **kw)
    C = len(tr.classes)

    def evaluate(train_feats, train_labels, query_feats, query_labels) -> dict:
        if cfg.protocol == "linear":
            return linear_probe(train_feats, train_labels, query_feats, query_labels, C, steps=cfg.steps, lr=cfg.lr,
                                weight_decay=cfg.weight_decay, batch_size=cfg.linear_batch_size, seed=cfg.seed,
                                device=device)
        return {key: accuracies(knn_predict(train_feats[key], train_labels, query_feats[key], C, cfg.k,
                                            cfg.temperature, center=cfg.center), query_labels, C)
                for key in train_feats}

    res = evaluate(ftr, ytr, fva, yva)  # what is reported: trained on every training label, scored on val
    fit, held = heldout_split(ytr, cfg.select_fraction, cfg.seed)
    chosen = None
    if len(held) and len(ftr) > 1:  # the choice: fitted on the rest of the training labels, scored on held-out
        sel = evaluate({k: v[fit] for k, v in ftr.items()}, ytr[fit], {k: v[held] for k, v in ftr.items()}, ytr[held])
        chosen = max(sel, key=lambda key: (sel[key]["top1"], key[0]))
    per_layer = [{"layer": layer, "pool": pool, **{m: round(v, 4) for m, v in res[(layer, pool)].items()},
                  **({"heldout_top1": round(sel[(layer, pool)]["top1"], 4)} if chosen else {})}
                 for layer, pool in sorted(res)]
    if chosen is None:  # one pair, or too few labels to hold any out: the deepest block of the first pooling
        chosen = (max(layers), pools[0]) if (max(layers), pools[0]) in res else sorted(res)[-1]
    best = next(r for r in per_layer if (r["layer"], r["pool"]) == chosen)
    # the images really used: the folders' header checks left out unreadable files, and one that failed to
    # decode during extraction is not in ytr/yva either
    result = {"protocol": cfg.protocol, "init": str(cfg.init), "num_classes": C, "num_train": len(ytr),
              "num_val": len(yva), "best": best,
              "selected_on": (f"held-out {len(held)} of the {len(ytr)} training images" if len(held) and len(res) > 1
                              else "nothing to choose" if len(res) == 1 else "no held-out labels: the deepest block"),
              "per_layer": per_layer, "config": dataclasses.asdict(cfg)}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_skip_list(Path(out).with_name(f"{Path(out).stem}.{SKIP_LIST}"), tr, va)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------------------------- online probe


def backbone_of(method: nn.Module) -> VisionTransformer:
    """The backbone a pretraining method exports, found by its ``state_prefix`` (the Method contract):
    ``"encoder."`` -> ``method.encoder``, iBOT's ``"teacher.backbone."`` -> ``method.teacher.backbone``."""
    from ..methods.base import hooks

    module: nn.Module = method
    for name in hooks(method).state_prefix.strip(".").split("."):
        module = getattr(module, name)
    return module  # type: ignore[return-value]


def _uint8_view(size: int):
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(size), v2.PILToTensor()])


class OnlineKNNProbe:
    """A kNN probe of the live backbone during pretraining (lightly's and solo-learn's online kNN).

    ``path`` is labelled: ``path/train/<class>/`` + ``path/val/<class>/`` (bank from train, queries from val),
    or ``path/<class>/`` (split per class). A fixed, seeded, class-balanced subset of ``bank_per_class`` +
    ``queries_per_class`` images is decoded once, to uint8 at the backbone's input size, so a probe costs one
    forward pass over them in eval mode, without gradients and without drawing from any random generator,
    so probing does not change the training run. Features: the backbone's output (``forward_features``, after
    its final LayerNorm), mean of the patch tokens; centred kNN as in :func:`knn_predict`. (``beit probe``
    instead reads each block before the final LayerNorm and reports the best block.)
    """

    def __init__(self, path: str | Path, img_size: int, *, every: int = 500, bank_per_class: int = 100,
                 queries_per_class: int = 50, k: int = 20, temperature: float = 0.07, seed: int = 0,
                 batch_size: int = 256) -> None:
        from ..data.views import IMAGENET_MEAN, IMAGENET_STD

        if every < 1 or bank_per_class < 1 or queries_per_class < 1:
            raise ConfigError("online probe: train.probe_every, probe.bank_per_class and "
                              "probe.queries_per_class must be >= 1")
        root = Path(path)
        tf = _uint8_view(img_size)
        if (root / "train").is_dir() and (root / "val").is_dir():
            bank, queries = labelled_splits(root, tf, tf, labels_per_class=bank_per_class, seed=seed)
            queries.samples = [queries.samples[i] for i in balanced_subset(
                queries.targets, labels_per_class=queries_per_class, seed=seed)]
        else:
            bank = ImageFolder(root, transform=tf, with_labels=True)
            keep = balanced_subset(bank.targets, labels_per_class=bank_per_class + queries_per_class, seed=seed)
            counts = torch.bincount(torch.tensor([bank.targets[i] for i in keep]), minlength=len(bank.classes))
            # a class with fewer images than asked is split in the same proportion (at least one in the bank)
            n_bank = [max(1, round(int(c) * bank_per_class / (bank_per_class + queries_per_class))) for c in counts]
            seen: dict[int, int] = {}
            bank_idx, query_idx = [], []
            for i in keep:
                t = bank.targets[i]
                (bank_idx if seen.get(t, 0) < n_bank[t] else query_idx).append(i)
                seen[t] = seen.get(t, 0) + 1
            queries = ImageFolder(root, transform=tf, with_labels=True)
            queries.samples = [bank.samples[i] for i in query_idx]
            bank.samples = [bank.samples[i] for i in bank_idx]
        if not len(queries):
            raise ConfigError(f"--probe-data {path}: too few images for a probe (no queries left)")
        self.every, self.k, self.temperature, self.batch_size = every, k, temperature, batch_size
        self.num_classes = len(bank.classes)
        self.bank_x, self.bank_y = self._decode(bank)  # (N, 3, S, S) uint8, (N,)
        self.query_x, self.query_y = self._decode(queries)
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255

    @staticmethod
    def _decode(ds) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(item for item in (ds[i] for i in range(len(ds))) if item is not None))
        return torch.stack(xs), torch.tensor(ys, dtype=torch.long)

    @torch.no_grad()
    def _features(self, backbone: VisionTransformer, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        out = []
        for chunk in x.split(self.batch_size):
            img = (chunk.float() - self.mean) / self.std  # (b, 3, S, S) normalised as the training views
            out.append(backbone.forward_features(img.to(device))[:, 1:].mean(dim=1).float().cpu())  # (b, D)
        return torch.cat(out)

    def __call__(self, method: nn.Module, device: torch.device | str = "cpu") -> dict[str, float]:
        """``{"knn_top1": %}`` of the method's backbone on the query images."""
        backbone = backbone_of(method)
        was_training = backbone.training
        backbone.eval()
        try:
            bank = self._features(backbone, self.bank_x, torch.device(device))
            query = self._features(backbone, self.query_x, torch.device(device))
        finally:
            backbone.train(was_training)
        scores = knn_predict(bank, self.bank_y, query, self.num_classes, self.k, self.temperature, center=True)
        return {"knn_top1": 100.0 * float((scores.argmax(1) == self.query_y).float().mean())}
