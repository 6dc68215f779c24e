"""Probes: weighted kNN (DINO formula) and the linear probe on cached features, per layer, and
``beit probe`` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from beit.config import ConfigError, ModelConfig, to_dict
from beit.models.vit import VisionTransformer
from beit.tasks.probe import (
    ProbeConfig,
    extract_features,
    knn_predict,
    linear_probe,
    parse_layers,
    pool_names,
    pool_tokens,
)
from tests.helpers.synthetic import make_colour_dataset

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


def test_grid_pooling_keeps_the_layout():
    torch.manual_seed(0)
    B, D, h, w = 2, 3, 4, 6  # a rectangular map of patch tokens
    tokens = torch.randn(B, 1 + h * w, D)
    fmap = tokens[:, 1:].reshape(B, h, w, D)  # row-major patches
    # one cell is the mean of the patch tokens
    torch.testing.assert_close(pool_tokens(tokens, "grid", (h, w), 1), tokens[:, 1:].mean(1))
    # 2 x 2 cells: each the mean of its quarter of the map, channel-major like a pooled conv map
    g = pool_tokens(tokens, "grid", (h, w), 2).reshape(B, D, 2, 2)
    torch.testing.assert_close(g[:, :, 0, 1], fmap[:, :2, 3:].mean(dim=(1, 2)))
    torch.testing.assert_close(g[:, :, 1, 0], fmap[:, 2:, :3].mean(dim=(1, 2)))
    # two images whose patches differ only in where they sit: same mean, different grid features
    swapped = torch.cat([tokens[:, :1], tokens[:, 1:].flip(1)], dim=1)
    torch.testing.assert_close(pool_tokens(swapped, "mean", (h, w)), pool_tokens(tokens, "mean", (h, w)))
    assert not torch.allclose(pool_tokens(swapped, "grid", (h, w), 2), pool_tokens(tokens, "grid", (h, w), 2))


def test_pool_all_extracts_three_poolings():
    torch.manual_seed(0)
    model = VisionTransformer(ModelConfig(**TINY)).eval()  # 4 x 4 patches of width 32
    ds = list(zip(torch.randn(3, 3, 16, 16), torch.arange(3)))
    feats, _ = extract_features(model, ds, [1], ["mean", "cls", "grid"], batch_size=2, grid=2)
    assert {k: v.shape[1] for k, v in feats.items()} == {(1, "mean"): 32, (1, "cls"): 32, (1, "grid"): 32 * 4}
    with pytest.raises(ConfigError, match="pool must be one of"):
        ProbeConfig(pool="max")
    with pytest.raises(ConfigError):
        ProbeConfig(grid=0)


def test_tokens_pooling_keeps_every_patch_token_in_place():
    torch.manual_seed(0)
    B, D, h, w = 2, 3, 2, 3
    tokens = torch.randn(B, 1 + h * w, D)
    flat = pool_tokens(tokens, "tokens", (h, w))
    assert flat.shape == (B, h * w * D)
    torch.testing.assert_close(flat.reshape(B, h * w, D), tokens[:, 1:])  # nothing pooled, [CLS] left out
    # on a map of grid x grid patches the grid pooling is the same features, channel-major
    sq = torch.randn(B, 1 + 4, D)
    torch.testing.assert_close(pool_tokens(sq, "grid", (2, 2), 2).reshape(B, D, 4).transpose(1, 2).flatten(1),
                               pool_tokens(sq, "tokens", (2, 2)))
    # names, aliases and comma lists; "all" leaves the tokens out, a list adds them once
    assert pool_names("all") == ["mean", "cls", "grid"]
    assert pool_names("all,tokens") == ["mean", "cls", "grid", "tokens"]
    assert pool_names("grid, mean,grid") == ["grid", "mean"]
    assert ProbeConfig(pool="both,tokens").pool == "both,tokens"
    with pytest.raises(ConfigError, match="'max'"):
        ProbeConfig(pool="all,max")


@pytest.mark.parametrize("protocol", ["knn", "linear"])
def test_probe_cli_end_to_end(tmp_path, capsys, protocol):
    from beit.cli import main

    data = make_colour_dataset(tmp_path / "data")
    torch.manual_seed(0)
    ck = save_backbone_dir(VisionTransformer(ModelConfig(**TINY)), tmp_path / "backbone")
    out = tmp_path / "probe.json"
    rc = main(["-q", "probe", protocol, "--json", "--data", str(data), "--init", str(ck), "--layers", "all", "--pool", "both",
               "--steps", "60", "--labels-per-class", "4", "--device", "cpu", "--workers", "0", "--out", str(out)])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res == {k: v for k, v in json.loads(out.read_text()).items() if k != "config"}
    assert res["num_train"] == 12 and res["num_val"] == 9 and res["num_classes"] == 3
    assert {(r["layer"], r["pool"]) for r in res["per_layer"]} == {(0, "mean"), (0, "cls"), (1, "mean"), (1, "cls")}
    # the pair is chosen on held-out training labels (1 of each class's 4), never on the reported validation set
    assert res["selected_on"] == "held-out 3 of the 12 training images"
    top = max((r["heldout_top1"], r["layer"]) for r in res["per_layer"])
    assert (res["best"]["heldout_top1"], res["best"]["layer"]) == top and res["best"] in res["per_layer"]
    assert all("top5" not in r for r in res["per_layer"])  # 3 classes
    # colours are separable even for a random backbone's mean-pooled features
    assert max(r["top1"] for r in res["per_layer"] if r["pool"] == "mean") == 100.0


def test_random_init_probes_the_architecture_with_fresh_weights(tmp_path, monkeypatch):
    from beit.tasks import probe

    data = make_colour_dataset(tmp_path / "data")
    torch.manual_seed(123)
    trained = VisionTransformer(ModelConfig(**TINY))
    with torch.no_grad():
        trained.cls_token.fill_(7.0)  # a "pretrained" weight the random control must not carry
    ck = save_backbone_dir(trained, tmp_path / "backbone")
    seen = []
    real = probe.extract_features
    monkeypatch.setattr(probe, "extract_features", lambda model, *a, **k: seen.append(model) or real(model, *a, **k))
    cfg = probe.build_config(overrides={"protocol": "knn", "init": f"random:{ck}", "seed": 3, "num_workers": 0,
                                        "data": {"path": str(data), "labels_per_class": 4}, "device": "cpu"})
    res = probe.run(cfg)
    model = seen[0]
    assert model.cfg == trained.cfg and not torch.equal(model.cls_token, trained.cls_token)
    torch.manual_seed(3)
    fresh = VisionTransformer(trained.cfg)  # seeded by probe.seed: the control is reproducible
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert res["init"] == f"random:{ck}" and res["best"]["top1"] >= 0


def test_overrides_may_follow_the_flags(tmp_path, capsys):
    """``beit probe knn --data D ... grid=2``: argparse alone rejects a key=value after the --flags when the
    command has a positional argument before its overrides."""
    from beit.cli import build_parser, main, parse

    args = parse(build_parser(), ["probe", "knn", "k=5", "--data", "d", "--init", "pixels", "grid=2", "--seed", "1",
                                  "temperature=0.1"])
    assert args.protocol == "knn" and args.seed == 1 and args.overrides == ["k=5", "grid=2", "temperature=0.1"]
    with pytest.raises(SystemExit):
        main(["probe", "knn", "--data", "d", "--init", "pixels", "--bogus", "grid=2"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    # end to end: the override after the flags takes effect
    data = make_colour_dataset(tmp_path / "data")
    ck = save_backbone_dir(VisionTransformer(ModelConfig(**TINY)), tmp_path / "backbone")
    assert main(["-q", "probe", "knn", "--data", str(data), "--init", str(ck), "--pool", "grid", "--workers", "0",
                 "--labels-per-class", "4", "--device", "cpu", "--out", str(tmp_path / "p.json"), "grid=1"]) == 0
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["config"]["grid"] == 1 and {r["pool"] for r in res["per_layer"]} == {"grid"}
