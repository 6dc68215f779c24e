"""After training: HF and timm exports that their own tools load as they are, ``model.pretrained_cfg`` +
``beit.transform_for``, ``num_classes=0``, and ``beit embed`` (kNN on its vectors = ``beit probe knn``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import beit
from beit.cli import main
from tests.helpers.synthetic import COLOURS, make_colour_dataset
from tests.tasks.test_finetune import make_pretraining_run

TINY = ["model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny fine-tuning run (crop 0.875, 20 px images) and a pretraining run on the colour dataset."""
    root = tmp_path_factory.mktemp("runs")
    data = make_colour_dataset(root / "data", size=20)
    rc = main(["-q", "finetune", "--data", str(data), "--init", "none", "--out", str(root / "ft"), "--steps", "3",
               "--batch-size", "6", "--workers", "0", "--device", "cpu", "aug.eval_crop_pct=0.875", *TINY])
    assert rc == 0
    pre = make_pretraining_run(root / "pre", data)
    return {"data": data, "ft": root / "ft", "pre": pre, "root": root}


def _val_images(data: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted((data / "val").rglob("*.png"))]


def _beit_logits(model, images) -> torch.Tensor:
    tf = beit.transform_for(model)
    with torch.no_grad():
        return model(torch.stack([tf(im) for im in images]))


def test_pretrained_cfg_comes_from_the_run(runs):
    ft = beit.load(runs["ft"])
    assert ft.pretrained_cfg["crop_pct"] == 0.875 and ft.pretrained_cfg["label_names"] == sorted(COLOURS)
    assert ft.pretrained_cfg["input_size"] == [3, 16, 16]
    pre = beit.load(runs["pre"])
    assert pre.pretrained_cfg["crop_pct"] == 1.0 and pre.pretrained_cfg["mean"] == [0.485, 0.456, 0.406]
    assert pre.pretrained_cfg["label_names"] is None
    # transform_for: short side to 16 / 0.875 = 18, centre crop 16, normalised
    x = beit.transform_for(ft)(Image.new("RGB", (40, 20), (255, 0, 0)))
    assert x.shape == (3, 16, 16)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225]))


def test_pretraining_config_records_its_normalisation():
    from beit.config import dump_yaml
    from beit.tasks import pretrain, segment

    saved = yaml.safe_load(dump_yaml(pretrain.build_config("beit_tiny_patch4_32")))
    assert saved["data"]["mean"] == [0.485, 0.456, 0.406] and saved["data"]["std"] == [0.229, 0.224, 0.225]
    assert yaml.safe_load(dump_yaml(segment.build_config(None, None, [])))["data"]["mean"] == [0.485, 0.456, 0.406]
    with pytest.raises(beit.config.ConfigError, match="ImageNet statistics"):
        pretrain.build_config("beit_tiny_patch4_32", None, ["data.mean=[0.5,0.5,0.5]"])


def test_num_classes_zero_gives_the_pooled_features_without_warnings(runs, caplog):
    ft = beit.load(runs["ft"])
    with caplog.at_level(logging.WARNING, logger="beit"):
        backbone = beit.load(runs["ft"], num_classes=0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        feats = backbone(x)
        assert feats.shape == (2, 32)
        torch.testing.assert_close(feats, ft.forward_pooled(x), rtol=0, atol=0)
        torch.testing.assert_close(ft.head(feats), ft(x), rtol=0, atol=0)


def test_hf_export_works_with_pipeline_and_auto_classes(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    from beit.runs import RunDir

    # the command line as run.json records it (here pytest's own argv would be recorded: replaced by a known one)
    RunDir(runs["ft"]).write_manifest(sessions=[{"command": "beit finetune --data data --init none --out ft --steps 3"}])
    out = tmp_path / "hf"
    assert main(["export", str(runs["ft"]), "--format", "hf", "--out", str(out)]) == 0
    conf = json.loads((out / "config.json").read_text())
    assert conf["id2label"] == {str(i): c for i, c in enumerate(sorted(COLOURS))}
    card = (out / "README.md").read_text()
    assert "```bash\nbeit finetune --data data --init none --out ft --steps 3\n```" in card  # from run.json
    assert "license: unknown" in card and "`data` (18 train, 9 val images)" in card and "3 steps" in card
    images = _val_images(runs["data"])
    model = beit.load(runs["ft"])
    ours = [model.pretrained_cfg["label_names"][i] for i in _beit_logits(model, images).argmax(1)]
    clf = transformers.pipeline("image-classification", model=str(out))
    theirs = [r[0]["label"] for r in clf(images)]
    assert theirs == ours and set(theirs) <= set(COLOURS)
    # the PIL backend gives exactly beit's pixels; the default (torchvision) one within one intensity level
    tf = beit.transform_for(model)
    ref = torch.stack([tf(im) for im in images])
    pil = transformers.AutoImageProcessor.from_pretrained(out, backend="pil")
    torch.testing.assert_close(pil(images, return_tensors="pt")["pixel_values"], ref, rtol=0, atol=1e-6)
    again = beit.load(out)  # and back: the export's preprocessing and names
    assert again.pretrained_cfg["label_names"] == sorted(COLOURS)
    torch.testing.assert_close(torch.stack([beit.transform_for(again)(im) for im in images]), ref, rtol=0, atol=0)
    # beit embed reads an export as it reads the run
    from_export, from_run = beit.embed(out, runs["data"] / "val", num_workers=0), beit.embed(runs["ft"], runs["data"] / "val", num_workers=0)
    np.testing.assert_allclose(from_export.features, from_run.features, rtol=0, atol=1e-5)
    default = transformers.AutoImageProcessor.from_pretrained(out)
    assert float((default(images, return_tensors="pt")["pixel_values"] - ref).abs().max()) <= 1.01 / 255 / 0.224
    # a backbone (num_classes=0) and an MIM model load with AutoModel; pooled features match beit's
    from beit.checkpoint_io import save_weights

    mim_model = beit.create_model("beit_tiny_patch4_32", img_size=16, depth=2, vocab_size=40).eval()
    save_weights(mim_model.state_dict(), tmp_path / "mim.safetensors", beit.interop.model_metadata(mim_model))
    assert main(["export", str(tmp_path / "mim.safetensors"), "--format", "hf", "--out", str(tmp_path / "mim")]) == 0
    assert type(transformers.AutoModel.from_pretrained(tmp_path / "mim")).__name__ == "BeitModel"
    assert transformers.AutoImageProcessor.from_pretrained(tmp_path / "mim").crop_size == {"height": 16, "width": 16}
    mim = transformers.BeitForMaskedImageModeling.from_pretrained(tmp_path / "mim").eval()
    mask = torch.zeros(len(ref), 16, dtype=torch.bool)
    mask[:, ::3] = True
    with torch.no_grad():
        torch.testing.assert_close(mim(pixel_values=ref, bool_masked_pos=mask).logits[mask],
                                   mim_model(ref, mask), rtol=0, atol=1e-4)
    backbone = beit.load(runs["ft"], num_classes=0)
    beit.exporting.export_hf(backbone, tmp_path / "backbone")
    for folder in (tmp_path / "backbone", out):  # BeitModel of the backbone, and of the classifier's export
        hf = transformers.AutoModel.from_pretrained(folder).eval()
        assert type(hf).__name__ == "BeitModel"
        with torch.no_grad():
            torch.testing.assert_close(hf(pixel_values=ref).pooler_output, backbone(ref), rtol=0, atol=1e-5)


def test_timm_documented_call_matches_beit(runs, tmp_path):
    timm = pytest.importorskip("timm")
    out = tmp_path / "timm"
    assert main(["export", str(runs["ft"]), "--format", "timm", "--out", str(out)]) == 0
    m = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    pc = m.pretrained_cfg
    assert pc["crop_pct"] == 0.875 and tuple(pc["input_size"]) == (3, 16, 16) and pc["num_classes"] == 3
    assert pc["label_names"] == sorted(COLOURS) and pc["mean"] == [0.485, 0.456, 0.406]
    images = _val_images(runs["data"])
    model = beit.load(runs["ft"])
    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=m))
    x = torch.stack([tf(im) for im in images])
    torch.testing.assert_close(x, torch.stack([beit.transform_for(model)(im) for im in images]), rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(m(x), model(x), rtol=0, atol=1e-5)
        pooled = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0).eval()(x)
        torch.testing.assert_close(pooled, beit.load(runs["ft"], num_classes=0)(x), rtol=0, atol=1e-5)
    card = (out / "README.md").read_text()
    assert f'timm.create_model("local-dir:{out}", pretrained=True)' in card and "random weights" in card
    assert beit.load(out).pretrained_cfg["crop_pct"] == 0.875  # and back


def test_embed_knn_equals_probe_knn(runs, tmp_path):
    from beit.tasks.probe import knn_predict

    data, pre = runs["data"], runs["pre"]
    for split in ("train", "val"):
        assert main(["-q", "embed", "--init", str(pre), "--data", str(data / split), "--out",
                     str(tmp_path / f"{split}.npy"), "--layer", "0", "--pool", "mean", "--workers", "0",
                     "--batch-size", "5"]) == 0
    tr, va = np.load(tmp_path / "train.npy"), np.load(tmp_path / "val.npy")
    index = (tmp_path / "val.csv").read_text().splitlines()
    assert index[0] == "row,path,label,class" and len(index) == 1 + len(va) == 10
    assert index[1].endswith(",0,blue") and index[-1].endswith(",2,red")
    ytr = np.array([int(r.split(",")[2]) for r in (tmp_path / "train.csv").read_text().splitlines()[1:]])
    yva = np.array([int(r.split(",")[2]) for r in index[1:]])
    scores = knn_predict(torch.from_numpy(tr), torch.from_numpy(ytr), torch.from_numpy(va), 3, k=20,
                         temperature=0.07, center=True)
    top1 = 100.0 * float((scores.argmax(1).numpy() == yva).mean())
    from beit.tasks import probe

    cfg = probe.build_config(None, {"protocol": "knn", "layers": "0", "pool": "mean", "num_workers": 0,
                                    "device": "cpu"})
    cfg.init, cfg.data.path = str(pre), str(data)
    res = probe.run(cfg)
    assert [r["top1"] for r in res["per_layer"] if r["layer"] == 0 and r["pool"] == "mean"] == [round(top1, 4)]
    # an existing output is never replaced without --overwrite
    assert main(["embed", "--init", str(pre), "--data", str(data / "val"), "--out", str(tmp_path / "val.npy")]) == 2


def test_embed_skips_unreadable_images_and_labels_only_class_folders(runs, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, colour in enumerate(((200, 0, 0), (0, 200, 0))):
        Image.new("RGB", (20, 12), colour).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    emb = beit.embed(runs["pre"], folder, num_workers=0)
    assert [Path(p).name for p in emb.paths] == ["0.png", "1.png"]  # the broken file is left out, not replaced
    assert emb.features.shape == (2, 32) and emb.classes == [] and emb.labels.tolist() == [-1, -1]
    assert np.isfinite(emb.features).all() and not np.allclose(emb.features[0], emb.features[1])
