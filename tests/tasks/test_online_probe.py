"""The no-learning baseline (``beit probe --init pixels``), centred kNN, and the online kNN probe that
``beit pretrain --probe-data`` runs during pretraining (every method; it must not change the losses)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from beit.cli import main
from beit.data.views import IMAGENET_MEAN, IMAGENET_STD
from beit.tasks.probe import knn_predict
from tests.cli.test_pretrain import TINY as BEIT_TINY
from tests.cli.test_pretrain import tiny_tokenizer  # noqa: F401 - fixture
from tests.helpers.synthetic import make_colour_dataset

MAE_TINY = ["model.embed_dim=32", "model.num_heads=2", "model.depth=2", "mae.decoder_dim=16", "mae.decoder_depth=1",
            "mae.decoder_heads=2", "train.num_workers=0", "train.log_every=1"]
IBOT_TINY = ["model.embed_dim=32", "model.num_heads=2", "model.depth=2", "ibot.out_dim=32", "ibot.hidden_dim=32",
             "ibot.bottleneck_dim=16", "train.num_workers=0", "train.log_every=1"]


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_centred_knn_by_hand():
    train = torch.tensor([[3.0, 1.0], [1.0, 3.0], [3.0, 2.0]])
    labels = torch.tensor([0, 1, 0])
    q = torch.tensor([[4.0, 1.0]])
    mu = train.mean(0)  # (7/3, 2)
    tr, qq = F.normalize(train - mu, dim=1), F.normalize(q - mu, dim=1)
    sim = (qq @ tr.t())[0]
    expect = torch.zeros(1, 2)
    for s, y in zip(sim, labels):
        expect[0, y] += torch.exp(s / 0.1)
    torch.testing.assert_close(knn_predict(train, labels, q, 2, k=3, temperature=0.1, center=True), expect)


def test_pixel_probe_is_knn_on_normalised_pixels(tmp_path, capsys):
    data = make_colour_dataset(tmp_path / "data", size=8)
    out = tmp_path / "p.json"
    assert main(["-q", "probe", "knn", "--data", str(data), "--init", "pixels", "--workers", "0", "--device", "cpu",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["per_layer"] == [{"layer": 0, "pool": "mean", "top1": 100.0}]  # 3 classes: no top-5
    assert res["selected_on"] == "nothing to choose" and res["best"] == res["per_layer"][0]
    assert res["num_train"] == 18 and res["num_val"] == 9

    # by hand: flattened ImageNet-normalised pixels, centred by the training mean, cosine, k=20, T=0.07
    def load(split):
        xs, ys = [], []
        for c, name in enumerate(sorted(p.name for p in (data / split).iterdir())):
            for f in sorted((data / split / name).glob("*.png")):
                a = torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255)
                a = (a - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
                xs.append(a.permute(2, 0, 1).flatten())
                ys.append(c)
        return torch.stack(xs), torch.tensor(ys)

    (xtr, ytr), (xva, yva) = load("train"), load("val")
    scores = knn_predict(xtr, ytr, xva, 3, k=20, temperature=0.07, center=True)
    assert 100.0 * float((scores.argmax(1) == yva).float().mean()) == res["best"]["top1"]


def test_pixel_probe_linear(tmp_path):
    data = make_colour_dataset(tmp_path / "data", size=8)
    out = tmp_path / "p.json"
    assert main(["-q", "probe", "linear", "--data", str(data), "--init", "pixels", "--steps", "50", "--workers", "0",
                 "--device", "cpu", "--img-size", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["per_layer"][0]["top1"] == 100.0  # solid colours are linearly separable from their pixels


def _pretrain(tmp_path, name, method_args, probe_data=None, steps=6):
    run = tmp_path / name
    extra = ["--probe-data", str(probe_data)] if probe_data else []
    flags = [a for a in method_args if "=" not in a]
    overrides = [a for a in method_args if "=" in a] + (["train.probe_every=3"] if probe_data else [])
    assert main(["-q", "pretrain", *flags, *extra, "--out", str(run), "--steps", str(steps), "--batch-size", "4",
                 "--precision", "fp32", "--device", "cpu", *overrides]) == 0
    return rows(run)


@pytest.mark.parametrize("method", ["beit", "mae", "ibot"])
def test_online_probe_logs_knn_and_leaves_losses_unchanged(tmp_path, make_image_folder, tiny_tokenizer,  # noqa: F811
                                                           method):
    data = make_image_folder(per_class=4)
    # the probe set: trivially separable colours, 32 px like the backbone; plain DIR/<class>/ layout
    probe = make_colour_dataset(tmp_path / "colours", n_train=8, n_val=0, size=32) / "train"
    args = {"beit": ["--tokenizer", str(tiny_tokenizer), *BEIT_TINY], "mae": ["--method", "mae", *MAE_TINY],
            "ibot": ["--method", "ibot", *IBOT_TINY]}[method]
    args = ["--data", str(data), *args]
    with_probe = _pretrain(tmp_path, "probed", args, probe_data=probe)
    without = _pretrain(tmp_path, "plain", args)
    knn = [r for r in with_probe if "knn_top1" in r]
    assert [r["step"] for r in knn] == [0, 3, 6]
    assert all(r["knn_top1"] == 100.0 for r in knn)  # 3 colours x (4 bank + 4 queries): separable
    losses = [(r["step"], r["loss"]) for r in with_probe if "loss" in r]
    assert losses == [(r["step"], r["loss"]) for r in without if "loss" in r] and len(losses) == 6


def test_online_probe_with_train_val_layout(tmp_path):
    from beit.config import ModelConfig
    from beit.models.vit import VisionTransformer
    from beit.tasks.probe import OnlineKNNProbe

    data = make_colour_dataset(tmp_path / "data", n_train=6, n_val=5, size=16)
    probe = OnlineKNNProbe(data, 16, every=1, bank_per_class=4, queries_per_class=2)
    assert len(probe.bank_y) == 12 and len(probe.query_y) == 6 and probe.bank_x.dtype == torch.uint8

    class Holder(torch.nn.Module):
        state_prefix = "model."

        def __init__(self):
            super().__init__()
            self.model = VisionTransformer(ModelConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2))

    m = Holder().train()
    assert probe(m) == {"knn_top1": 100.0}
    assert m.model.training  # the probe restores the training mode
