"""Probes: weighted kNN (DINO formula) and the linear probe on cached features, per layer, and
``beit probe`` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from synthetic import make_colour_dataset

from beit.config import ConfigError, ModelConfig, to_dict
from beit.models.vit import VisionTransformer
from beit.tasks.probe import extract_features, knn_predict, linear_probe, parse_layers

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def save_backbone_dir(model: VisionTransformer, path: Path) -> Path:
    """A checkpoint folder (weights + config.yaml) that ``beit.load`` reads, as a run writes one."""
    from beit.checkpoint import save_weights_dir

    save_weights_dir(path, {f"model.{k}": v for k, v in model.state_dict().items()}, {"state_prefix": "model."},
                     yaml.safe_dump({"model": to_dict(model.cfg)}))
    return path


def separable(n_per_class: int, num_classes: int = 4, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(num_classes, dim) * 5
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centers[y] + 0.3 * torch.randn(len(y), dim, generator=g), y


def test_knn_on_separable_features_is_perfect():
    xtr, ytr = separable(10)
    xte, yte = separable(5, seed=1)
    scores = knn_predict(xtr, ytr, xte, 4, k=20, temperature=0.07)
    assert (scores.argmax(1) == yte).all()


def test_knn_weights_follow_the_dino_formula():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[2.0, 0.0]])  # cosine similarities: 1, 0, 1/sqrt(2)
    s = knn_predict(train, labels, q, 2, k=3, temperature=0.5)
    expect = torch.tensor([[math.exp(1 / 0.5), math.exp(0.0) + math.exp((1 / math.sqrt(2)) / 0.5)]])
    torch.testing.assert_close(s, expect)
    # k=2 drops the least similar neighbour (label 1, similarity 0)
    s2 = knn_predict(train, labels, q, 2, k=2, temperature=0.5)
    torch.testing.assert_close(s2, torch.tensor([[math.exp(2.0), math.exp(math.sqrt(2))]]))


def test_linear_probe_on_separable_features_is_perfect():
    xtr, ytr = separable(20)
    xte, yte = separable(5, seed=1)
    res = linear_probe({"a": xtr, "b": xtr * 3 + 1}, ytr, {"a": xte, "b": xte * 3 + 1}, yte, 4, steps=100,
                       lr=1e-2, batch_size=32)
    assert res["a"]["top1"] == 100.0 and res["b"]["top1"] == 100.0


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("3,-1, 0", 6) == [0, 3, 5]
    with pytest.raises(ConfigError):
        parse_layers("7", 6)
    with pytest.raises(ConfigError):
        parse_layers("x", 6)


def test_extract_features_pools_the_block_outputs():
    torch.manual_seed(0)
    model = VisionTransformer(ModelConfig(**TINY)).eval()
    x = torch.randn(5, 3, 16, 16)
    ds = list(zip(x, torch.arange(5)))
    feats, labels = extract_features(model, ds, [0, 1], ["mean", "cls"], batch_size=2)
    ref = model.get_intermediate_layers(x, [0, 1])
    torch.testing.assert_close(feats[(0, "mean")], ref[0][:, 1:].mean(1))
    torch.testing.assert_close(feats[(1, "cls")], ref[1][:, 0])
    assert labels.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("protocol", ["knn", "linear"])
def test_probe_cli_end_to_end(tmp_path, capsys, protocol):
    from beit.cli import main

    data = make_colour_dataset(tmp_path / "data")
    torch.manual_seed(0)
    ck = save_backbone_dir(VisionTransformer(ModelConfig(**TINY)), tmp_path / "backbone")
    out = tmp_path / "probe.json"
    rc = main(["-q", "probe", protocol, "--data", str(data), "--init", str(ck), "--layers", "all", "--pool", "both",
               "--steps", "60", "--labels-per-class", "4", "--device", "cpu", "--workers", "0", "--out", str(out)])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res == {k: v for k, v in json.loads(out.read_text()).items() if k != "config"}
    assert res["num_train"] == 12 and res["num_val"] == 9 and res["num_classes"] == 3
    assert {(r["layer"], r["pool"]) for r in res["per_layer"]} == {(0, "mean"), (0, "cls"), (1, "mean"), (1, "cls")}
    assert res["best"]["top1"] == max(r["top1"] for r in res["per_layer"])
    # colours are separable even for a random backbone's mean-pooled features
    assert max(r["top1"] for r in res["per_layer"] if r["pool"] == "mean") == 100.0
