"""The Python API for notebooks: ``beit.finetune``/``pretrain``/``probe``/``embed`` with keyword arguments,
nested config as dicts or dataclasses, a folder or a ``torch.utils.data.Dataset`` as data; and the API
reference (pdoc) builds from the docstrings."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image

import beit
from beit.config import OptimConfig
from tests.helpers.synthetic import COLOURS, make_colour_dataset

TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


# the public API's modules, as `make docs` builds them (Makefile)
API_MODULES = ["beit", "beit.workflows", "beit.loading", "beit.preprocess", "beit.exporting", "beit.tasks.embed",
               "beit.config", "beit.models.vit"]


class ColourList(torch.utils.data.Dataset):
    """(PIL image, label) items, as a torchvision dataset gives them; no ``classes`` attribute."""

    def __init__(self, root, split):
        self.items = [(p, i) for i, c in enumerate(sorted(COLOURS)) for p in sorted((root / split / c).glob("*.png"))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        p, y = self.items[i]
        return Image.open(p).convert("RGB"), y


def test_import_beit_does_not_load_the_training_code():
    code = ("import sys, beit; assert 'beit.workflows' not in sys.modules and 'beit.engine' not in sys.modules; "
            "beit.load; assert 'beit.workflows' not in sys.modules; beit.finetune; assert 'beit.engine' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_finetune_from_a_folder_and_from_a_dataset(tmp_path):
    data = make_colour_dataset(tmp_path / "data", size=16)
    common = dict(init="none", steps=2, model=TINY, train={"batch_size": 6, "num_workers": 0, "device": "cpu"},
                  aug={"mixup": 0.0, "cutmix": 0.0})
    res = beit.finetune(data=data, out=tmp_path / "ft", optim={"lr": 1e-3}, **common)
    assert res.run_dir == tmp_path / "ft" and res.step == 2 and res.status == "done" and "top1" in res.best
    saved = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 1e-3 and saved["model"]["embed_dim"] == 32
    assert (tmp_path / "ft" / "classes.txt").read_text().split() == sorted(COLOURS)

    res = beit.finetune(data=ColourList(data, "train"), val_data=ColourList(data, "val"), out=tmp_path / "ft_ds",
                        optim=OptimConfig(lr=2e-3, min_lr=1e-6, weight_decay=0.05, warmup_fraction=0.2), **common)
    assert res.step == 2 and 0.0 <= res.best["top1"] <= 100.0
    saved = yaml.safe_load((tmp_path / "ft_ds" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 2e-3 and saved["data"]["path"].startswith("(Python dataset ColourList")
    model = beit.load(res.run_dir)
    assert model.cfg.num_classes == 3 and model.pretrained_cfg["label_names"] == ["0", "1", "2"]


def test_pretrain_from_a_dataset_then_probe_and_embed(tmp_path):
    data = make_colour_dataset(tmp_path / "data", size=16)
    res = beit.pretrain(data=ColourList(data, "train"), out=tmp_path / "mae", method="mae", preset="mae_tiny_patch4_32",
                        steps=2, model=TINY, train={"batch_size": 6, "num_workers": 0, "device": "cpu"})
    assert res.step == 2 and (tmp_path / "mae" / "config.yaml").is_file()
    pr = beit.probe(data, init=res.run_dir, protocol="knn", layers="-1", num_workers=0, device="cpu")
    assert pr.best["layer"] == 1 and pr.extra["num_val"] == 9
    emb = beit.embed(res.run_dir, data / "val", tmp_path / "val.npy", num_workers=0)
    assert emb.features.shape == (9, 32) and emb.classes == sorted(COLOURS) and (tmp_path / "val.csv").is_file()


def test_api_reference_builds(tmp_path):
    pytest.importorskip("pdoc")
    subprocess.run([sys.executable, "-m", "pdoc", *API_MODULES, "-o", str(tmp_path)], check=True,
                   capture_output=True, timeout=600)
    page = (tmp_path / "beit" / "workflows.html").read_text()
    assert "def finetune" in page.replace("<span class=\"k\">def</span> <span class=\"nf\">", "def ") \
        or 'id="finetune"' in page
    assert 'id="RunResult"' in page and (tmp_path / "beit" / "preprocess.html").is_file()


def test_segment_and_train_tokenizer_from_python(tmp_path):
    from beit.models.tokenizer import Tokenizer
    from tests.tasks.test_segment import make_shapes_dataset

    seg = beit.segment(make_shapes_dataset(tmp_path / "seg_data"), out=tmp_path / "seg", steps=2, model=TINY,
                       head={"channels": 16, "aux_channels": 8},
                       train={"batch_size": 3, "num_workers": 0, "device": "cpu"})
    assert seg.step == 2 and "mIoU" in seg.best and beit.load(seg.run_dir).num_layers == 2
    data = make_colour_dataset(tmp_path / "data", size=16)
    tok = beit.train_tokenizer(ColourList(data, "train"), out=tmp_path / "tok", preset=None, steps=2,
                               model={"img_size": 16, "vocab_size": 64, "n_hid": 16, "n_groups": 3,
                                      "n_blk_per_group": 1, "n_init": 32},
                               train={"batch_size": 6, "num_workers": 0, "device": "cpu"})
    assert tok.run_dir == tmp_path / "tok" and tok.step == 2 and "loss" in tok.metrics
    tokenizer = beit.load(tok.run_dir)
    assert isinstance(tokenizer, Tokenizer)
    with pytest.raises(beit.config.ConfigError, match="is a tokenizer"):
        beit.exporting.export(tok.run_dir, "hf", tmp_path / "tok_hf")
    x = beit.transform_for(tokenizer)(Image.new("RGB", (24, 20), (255, 0, 0)))  # [0, 1] at the tokenizer's size
    assert x.shape == (3, 16, 16) and float(x[0].min()) == 1.0 and float(x[1:].max()) == 0.0
