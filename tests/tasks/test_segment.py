"""Segmentation: mIoU against a hand computation, heads and pyramid shapes, joint transforms, and
``beit segment`` end to end on coloured shapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from beit.config import ModelConfig
from beit.data.segmentation import SegTransform
from beit.models.vit import VisionTransformer
from beit.tasks.heads import FeaturePyramid, PUPHead, UperNetHead
from beit.tasks.segment import (
    SegHeadConfig,
    SegmentationTask,
    confusion_matrix,
    default_out_indices,
    segmentation_metrics,
)

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, use_shared_rel_pos_bias=False,
            use_rel_pos_bias=True)
RED, BLUE, GREY = (220, 30, 30), (30, 30, 220), (128, 128, 128)


def make_shapes_dataset(root: Path, n_train: int = 6, n_val: int = 2, size: int = 16, width: int = 0,
                        splits: tuple[str, ...] = ("train", "val")) -> Path:
    """images/{split}/i.png (``size`` high, ``width`` or ``size`` wide): a red rectangle (class 1) and a blue
    disk (class 2) on grey (class 0); the top row of every mask is 255 (ignore)."""
    rng = np.random.default_rng(0)
    width = width or size
    for split, n in zip(splits, (n_train, n_val, n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.empty((size, width, 3), np.uint8)
            img[:] = GREY
            mask = np.zeros((size, width), np.uint8)
            y, x = rng.integers(0, size // 2, 2)
            h, w = rng.integers(size // 4, size // 2, 2)
            img[y:y + h, x:x + w], mask[y:y + h, x:x + w] = RED, 1
            yy, xx = np.mgrid[:size, :width]
            cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 5) ** 2
            img[disk], mask[disk] = BLUE, 2
            mask[0] = 255
            Image.fromarray(img).save(root / "images" / split / f"{i}.png")
            Image.fromarray(mask, mode="L").save(root / "masks" / split / f"{i}.png")
    return root


def test_miou_matches_a_hand_computation():
    target = torch.tensor([0, 0, 1, 1, 2, 255])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    conf = confusion_matrix(pred, target, num_classes=4)  # class 3: absent from both, not averaged
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    m = segmentation_metrics(conf)
    # IoU_0 = 1 / (2 + 2 - 1), IoU_1 = 2 / (2 + 3 - 2), IoU_2 = 0 / (1 + 0 - 0)
    assert m["iou_0"] == pytest.approx(100 / 3)
    assert m["iou_1"] == pytest.approx(200 / 3)
    assert m["iou_2"] == 0.0
    assert "iou_3" not in m
    assert m["mIoU"] == pytest.approx(100 / 3)
    assert m["pixel_acc"] == pytest.approx(60.0)  # 3 of the 5 labelled pixels
    assert m["mAcc"] == pytest.approx(100 * (0.5 + 1.0 + 0.0) / 3)


def test_pyramid_and_heads_shapes():
    maps = [torch.randn(2, 32, 4, 4) for _ in range(4)]
    pyr = FeaturePyramid(32)(maps)
    assert [tuple(p.shape[-2:]) for p in pyr] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert UperNetHead(32, 5, channels=16)(pyr).shape == (2, 5, 16, 16)
    assert PUPHead(32, 5, channels=16)(torch.randn(2, 17, 32), (4, 4)).shape == (2, 5, 64, 64)
    assert default_out_indices(12) == [3, 5, 7, 11]
    assert default_out_indices(24) == [7, 11, 15, 23]
    assert default_out_indices(4) == [0, 1, 2, 3]


@pytest.mark.parametrize("kind", ["upernet", "pup"])
def test_task_trains_one_step(kind):
    torch.manual_seed(0)
    task = SegmentationTask(VisionTransformer(ModelConfig(**TINY)), 3,
                            SegHeadConfig(kind=kind, channels=16, aux_channels=8))
    batch = {"images": torch.randn(2, 3, 16, 16), "masks": torch.randint(0, 3, (2, 16, 16))}
    batch["masks"][:, 0] = 255
    loss, metrics = task(batch)
    loss.backward()
    assert torch.isfinite(loss) and 0 <= float(metrics["pixel_acc"]) <= 100
    assert task.model.blocks[0].attn.qkv.weight.grad is not None
    task.eval()
    assert task.predict(batch["images"]).shape == (2, 16, 16)


def test_joint_transform_keeps_image_and_mask_aligned():
    size = 32
    img = np.empty((40, 48, 3), np.uint8)
    img[:] = GREY
    mask = np.zeros((40, 48), np.uint8)
    img[:, 24:], mask[:, 24:] = RED, 1
    img[30:], mask[30:] = BLUE, 2
    mask[:2] = 255
    tf = SegTransform(size, train=True, scale=(0.3, 1.0))
    for seed in range(8):
        torch.manual_seed(seed)
        out = tf(Image.fromarray(img), mask)
        x, m = out["images"], out["masks"]
        assert x.shape == (3, size, size) and m.shape == (size, size) and m.dtype == torch.int64
        assert set(m.unique().tolist()) <= {0, 1, 2, 255}  # nearest: no new labels
        red = x[0] > x[2] + 1.0  # normalised red channel well above blue: the red region
        agree = (red == (m == 1))[m != 255].float().mean()
        assert agree > 0.9


def test_segment_cli_end_to_end(tmp_path, capsys):
    import beit
    from beit.cli import main
    from beit.tasks.segment import load_segmenter

    data = make_shapes_dataset(tmp_path / "data")
    run = tmp_path / "seg"
    rc = main(["-q", "segment", "--json", "--data", str(data), "--init", "none", "--out", str(run), "--steps", "4",
               "--batch-size", "3", "--workers", "0", "--device", "cpu", "model.img_size=16",
               "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
               "head.channels=16", "head.aux_channels=8"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "mIoU" in summary["best"]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_mIoU" in r]
    assert len(evals) == 2 and {"val_pixel_acc", "val_mAcc", "val_iou_0", "val_loss"} <= set(evals[-1])
    assert (run / "predictions.png").is_file()
    w, h = Image.open(run / "predictions.png").size
    assert 2 * w == 3 * h  # two validation images: rows of three 16 px panels (image | truth | prediction)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["num_classes"] == 3 and cfg["model"]["use_rel_pos_bias"]

    backbone = beit.load(run)  # the backbone alone
    assert backbone.cfg.num_classes == 0 and backbone.num_layers == 2
    seg = load_segmenter(run)
    torch.testing.assert_close(seg.model.blocks[1].mlp.fc1.weight, backbone.blocks[1].mlp.fc1.weight)
    assert seg.predict(torch.randn(1, 3, 16, 16)).shape == (1, 16, 16)


def test_segment_data_errors(tmp_path):
    from beit.cli import main

    data = make_shapes_dataset(tmp_path / "data", n_train=2, n_val=1)
    (data / "masks" / "val" / "0.png").unlink()
    rc = main(["-q", "segment", "--data", str(data), "--init", "none", "--out", str(tmp_path / "r"), "--steps", "1"])
    assert rc == 2


def test_segment_cli_on_rectangles(tmp_path, capsys):
    """16x24 images (a 4x6 patch grid) through ``beit segment``; the model is initialised from a square
    (8x8 grid) backbone, whose relative tables are copied per layer and resized."""
    from beit.checkpoint_io import save_weights
    from beit.cli import main
    from beit.interop import model_metadata
    from beit.tasks.segment import load_segmenter

    data = make_shapes_dataset(tmp_path / "data", size=16, width=24)
    sq = VisionTransformer(ModelConfig(**{**TINY, "img_size": 32, "use_shared_rel_pos_bias": True,
                                          "use_rel_pos_bias": False}))
    with torch.no_grad():
        sq.rel_pos_bias.relative_position_bias_table.normal_()
    save_weights(sq.state_dict(), tmp_path / "sq.safetensors", model_metadata(sq))
    run = tmp_path / "seg"
    rc = main(["-q", "segment", "--json", "--data", str(data), "--init", str(tmp_path / "sq.safetensors"), "--out", str(run),
               "--steps", "2", "--batch-size", "3", "--workers", "0", "--device", "cpu", "model.img_size=[16,24]",
               "head.channels=16", "head.aux_channels=8"])
    assert rc == 0
    assert "mIoU" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["best"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["img_size"] == [16, 24] and cfg["model"]["use_rel_pos_bias"]
    seg = load_segmenter(run)
    assert seg.model.grid_size == (4, 6)
    assert seg.predict(torch.randn(1, 3, 16, 24)).shape == (1, 16, 24)
    w, h = Image.open(run / "predictions.png").size
    assert w * 2 * 16 == h * 3 * 24  # two rows of three 24x16 panels


def test_poly_schedule_by_hand():
    from beit.config import OptimConfig
    from beit.optim import lr_at

    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=2, schedule="poly", power=1.0)
    # warmup scales the polynomial rate: (1 - step/10) * (step + 1) / 2, then (1 - step/10)
    assert [round(lr_at(s, 10, cfg), 6) for s in (0, 1, 2, 5, 9)] == [0.5, 0.9, 0.8, 0.5, 0.1]
    sq = OptimConfig(lr=2.0, min_lr=0.5, warmup_steps=0, schedule="poly", power=2.0)
    assert lr_at(5, 10, sq) == pytest.approx(0.5 + 1.5 * 0.25)
    assert lr_at(10, 10, sq) == pytest.approx(0.5)
    with pytest.raises(Exception, match="optim.schedule"):
        OptimConfig(schedule="step")


def _rect_task(eval_cfg=None):
    torch.manual_seed(0)
    m = VisionTransformer(ModelConfig(**{**TINY, "img_size": (16, 24)}))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    task = SegmentationTask(m, 3, SegHeadConfig(channels=8, aux_channels=8), eval_cfg)
    return task.eval()


def test_sliding_window_equals_whole_image_when_window_is_the_image():
    from beit.tasks.segment_eval import SegEvalConfig, score, slide_logits, window_starts

    assert window_starts(24, 24, 16) == [0]
    assert window_starts(32, 24, 8) == [0, 8]
    assert window_starts(30, 16, 10) == [0, 10, 14]  # the last window ends at the border
    task = _rect_task()
    g = torch.Generator().manual_seed(0)
    batches = [{"images": torch.randn(2, 3, 16, 24, generator=g), "masks": torch.randint(0, 3, (2, 16, 24), generator=g)}
               for _ in range(2)]
    whole = score(task, batches, SegEvalConfig(mode="whole"))
    slide = score(task, batches, SegEvalConfig(mode="slide", stride=[5, 7]))
    assert torch.equal(whole[0], slide[0]) and whole[1] == slide[1]
    with torch.no_grad():  # the same kernels as in evaluation
        assert torch.equal(slide_logits(task, batches[0]["images"], (5, 7)), task.logits(batches[0]["images"])[0])
        # two overlapping windows along the width: averaged where they overlap (columns 8..23)
        wide = torch.randn(1, 3, 16, 32, generator=g)
        left, right = task.logits(wide[..., :24])[0], task.logits(wide[..., 8:])[0]
    want = torch.cat([left[..., :8], (left[..., 8:] + right[..., :16]) / 2, right[..., 16:]], dim=-1)
    torch.testing.assert_close(slide_logits(task, wide, (16, 8)), want)
    with pytest.raises(Exception, match="smaller than the window"):
        slide_logits(task, torch.randn(1, 3, 16, 16), (8, 8))


def test_whole_image_at_another_size_resizes_the_backbone():
    from beit.tasks.segment_eval import SegEvalConfig, backbone_at

    task = _rect_task(SegEvalConfig(mode="whole", size=[24, 32]))
    assert backbone_at(task.model, (16, 24)) is task.model
    big = backbone_at(task.model, (24, 32))
    assert big.grid_size == (6, 8) and big is not task.model
    torch.testing.assert_close(big.blocks[1].mlp.fc1.weight, task.model.blocks[1].mlp.fc1.weight)
    assert task.predict(torch.randn(2, 3, 24, 32)).shape == (2, 24, 32)


def test_segment_cli_scores_best_checkpoint_on_val_and_test(tmp_path):
    from beit.cli import main

    data = make_shapes_dataset(tmp_path / "data", n_train=4, size=16, width=24, splits=("train", "val", "test"))
    run = tmp_path / "seg"
    rc = main(["-q", "segment", "--data", str(data), "--init", "none", "--out", str(run), "--steps", "2",
               "--batch-size", "2", "--workers", "0", "--device", "cpu", "model.img_size=[16,24]",
               "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
               "head.channels=16", "head.aux_channels=8", "eval.mode=slide", "eval.size=[16,32]",
               "eval.stride=[8,8]", "data.class_names=[grey,red,blue]", "train.precision=fp32"])
    assert rc == 0
    res = json.loads((run / "eval.json").read_text())
    assert res["checkpoint"].endswith("best") and res["eval"]["mode"] == "slide"
    evals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "val_mIoU" in ln]
    best = max(r["val_mIoU"] for r in evals)
    assert res["val"]["mIoU"] == pytest.approx(best)  # the best checkpoint, scored as during training
    assert res["test"]["images"] == 2 and set(res["test"]["iou"]) <= {"grey", "red", "blue"}
    conf = torch.tensor(res["test"]["confusion"])
    assert conf.shape == (3, 3) and int(conf.sum()) == 2 * 15 * 32  # the top row of each mask is ignored
    for name in ("confusion_val.png", "confusion_test.png", "predictions_test.png"):
        assert (run / name).is_file()


def test_constant_baseline_by_hand(tmp_path):
    from beit.data.segmentation import load_mask
    from beit.tasks.segment_eval import constant_baseline

    data = make_shapes_dataset(tmp_path / "data", n_train=3, size=16, width=24, splits=("train", "val", "test"))
    res = constant_baseline(data)
    assert res["class"] == 0  # grey covers most of every image
    masks = np.stack([load_mask(p) for p in sorted((data / "masks" / "test").glob("*.png"))])
    labelled = masks != 255
    grey = (masks == 0).sum() / labelled.sum()
    present = len(set(np.unique(masks[labelled]).tolist()))  # classes with union > 0: those in the truth
    assert res["test"]["pixel_acc"] == pytest.approx(100 * grey)
    assert res["test"]["mIoU"] == pytest.approx(100 * grey / present)  # IoU_0 = grey share, others 0
    assert res["test"]["mAcc"] == pytest.approx(100 / present)
