"""Fine-tuning: Mixup/CutMix targets, layer-wise lr decay, balanced subsets, init from a pretraining run,
and ``beit finetune`` end to end on a tiny colour-coded dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from beit.config import ModelConfig, OptimConfig, TrainConfig, to_dict
from beit.optim import build_optimizer, set_lr
from beit.tasks import finetune
from beit.tasks.augment import AugConfig, Mixup, build_eval_transform, build_train_transform, one_hot_smooth
from beit.tasks.finetune import ClassificationTask
from beit.tasks.metrics import topk_correct
from tests.helpers.synthetic import COLOURS, make_colour_dataset

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
TINY_OV = [f"model.{k}={v}" for k, v in TINY.items()]


def make_pretraining_run(run: Path, data: Path) -> Path:
    """A real 2-step BEiT run (pixel targets: no tokenizer needed) through the engine."""
    from beit.config import dump_yaml
    from beit.data.folder import ImageFolder
    from beit.engine import train
    from beit.methods.beit import BEiTConfig, BEiTMethod, build_pretrain_transform

    bcfg = BEiTConfig(target="pixels", min_block=2, mask_ratio=0.4)
    method = BEiTMethod.build(ModelConfig(**TINY), None, bcfg)
    # a pretraining run's rel-pos tables start at zero: give the shared one values so the copy is checked
    with torch.no_grad():
        method.model.rel_pos_bias.relative_position_bias_table.normal_()
    ds = ImageFolder(data / "train", transform=build_pretrain_transform(bcfg, method.model.cfg, None))
    train(method, ds, train_cfg=TrainConfig(steps=2, batch_size=6, num_workers=0, log_every=1, device="cpu"),
          optim_cfg=OptimConfig(lr=1e-3), run_dir=run,
          config_yaml=dump_yaml({"model": to_dict(method.model.cfg), "beit": to_dict(bcfg)}))
    return run


# --------------------------------------------------------------------------------------------- mixing


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixup_cutmix_targets_sum_to_one(mixup, cutmix):
    torch.manual_seed(0)
    mix = Mixup(num_classes=5, mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1)
    x = torch.randn(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    for _ in range(10):
        xm, t = mix(x, y)
        assert xm.shape == x.shape and t.shape == (6, 5)
        torch.testing.assert_close(t.sum(1), torch.ones(6))
        assert (t >= 0).all()


def test_cutmix_lambda_is_the_pasted_area():
    """With smoothing 0, each target's weight on its own class equals the fraction of its own pixels."""
    torch.manual_seed(1)
    mix = Mixup(num_classes=4, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 10, 10).contiguous()
    y = torch.arange(4)
    for _ in range(10):
        xm, t = mix(x, y)
        own = (xm[:, 0] == x[:, 0]).float().mean(dim=(1, 2))  # fraction of each image that is still its own
        torch.testing.assert_close(t[torch.arange(4), y], own)


def test_one_hot_smooth_matches_timm_convention():
    t = one_hot_smooth(torch.tensor([2]), 4, 0.1)
    torch.testing.assert_close(t, torch.tensor([[0.025, 0.025, 0.925, 0.025]]))


def test_transforms_shapes():
    img = Image.new("RGB", (20, 24), (100, 150, 200))
    cfg = AugConfig()
    torch.manual_seed(0)
    assert build_train_transform(cfg, 16)(img).shape == (3, 16, 16)
    assert build_eval_transform(cfg, 16)(img).shape == (3, 16, 16)


# --------------------------------------------------------------------------------------------- optimisation


def test_layer_decay_gives_each_parameter_its_lr():
    from beit.models.vit import VisionTransformer

    L, decay, base = 2, 0.65, 4e-3
    model = VisionTransformer(ModelConfig(**TINY, num_classes=3, use_shared_rel_pos_bias=False, use_rel_pos_bias=True))
    task = ClassificationTask(model)
    ocfg = OptimConfig(lr=base, weight_decay=0.05, layer_decay=decay)
    groups = task.param_groups(ocfg)
    opt = build_optimizer(groups, ocfg)
    set_lr(opt, base)
    lr_of, wd_of = {}, {}
    for g in opt.param_groups:
        for n in g["param_names"]:
            lr_of[n], wd_of[n] = g["lr"], g["weight_decay"]
    names = {n for n, _ in task.named_parameters()}
    assert set(lr_of) == names
    expected = {
        # embeddings: decay^(L+1); block i: decay^(L-i); head and fc_norm: the base rate (BEiT Appendix C)
        "model.cls_token": base * decay ** (L + 1),
        "model.patch_embed.proj.weight": base * decay ** 3,
        "model.blocks.0.attn.qkv.weight": base * decay ** L,
        "model.blocks.0.attn.relative_position_bias_table": base * decay ** 2,
        "model.blocks.1.mlp.fc1.weight": base * decay ** (L - 1),
        "model.blocks.1.norm2.weight": base * decay ** 1,
        "model.fc_norm.weight": base,
        "model.head.weight": base,
        "model.head.bias": base,
    }
    for n, lr in expected.items():
        assert lr_of[n] == pytest.approx(lr), n
    for n in ("model.cls_token", "model.head.bias", "model.blocks.0.attn.relative_position_bias_table",
              "model.blocks.1.norm2.weight", "model.blocks.0.gamma_1"):
        assert wd_of[n] == 0.0, n
    for n in ("model.head.weight", "model.blocks.0.attn.qkv.weight", "model.patch_embed.proj.weight"):
        assert wd_of[n] == 0.05, n


def test_topk_correct_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_correct(logits, labels, (1, 2, 5)) == [1, 2, 3]


# --------------------------------------------------------------------------------------------- runs


def test_init_from_pretraining_run_loads_the_backbone(tmp_path):
    data = make_colour_dataset(tmp_path / "data")
    pre = make_pretraining_run(tmp_path / "pre", data)
    from beit.loading import run_backbone_state

    _, sd = run_backbone_state(pre)
    cfg = finetune.build_config("beit_tiny_patch4_32", None, ["model.img_size=16"])
    cfg.init = str(pre)
    task, cfg = finetune.build_task(cfg, num_classes=3)
    own = task.model.state_dict()
    assert cfg.model.depth == 2 and cfg.model.embed_dim == 32  # the architecture came from the checkpoint
    for k, v in sd.items():
        if k.startswith(("blocks.", "patch_embed.", "cls_token")) and not k.endswith("relative_position_bias_table"):
            torch.testing.assert_close(own[k], v, msg=k)
    shared = sd["rel_pos_bias.relative_position_bias_table"]
    for i in range(2):
        torch.testing.assert_close(own[f"blocks.{i}.attn.relative_position_bias_table"], shared)
    assert cfg.model.use_rel_pos_bias and not cfg.model.use_shared_rel_pos_bias
    assert task.model.head.weight.abs().max() < 0.001  # head scaled by 0.001 at init

    scratch, _ = finetune.build_task(finetune.build_config("beit_tiny_patch4_32", None, TINY_OV + ["init=none"]), 3)
    assert not torch.equal(scratch.model.blocks[0].attn.qkv.weight, own["blocks.0.attn.qkv.weight"])


def test_finetune_cli_end_to_end(tmp_path, capsys):
    import beit
    from beit.cli import main

    data = make_colour_dataset(tmp_path / "data")
    pre = make_pretraining_run(tmp_path / "pre", data)
    run = tmp_path / "ft"
    rc = main(["-q", "finetune", "--json", "--data", str(data), "--init", str(pre), "--out", str(run),
               "--labels-per-class", "4", "--steps", "4", "--batch-size", "6", "--workers", "0",
               "--device", "cpu", "model.img_size=16", "train.log_every=1"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 4 and "best" in summary
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_top1" in r]
    assert len(evals) == 2  # 12 of 18 images -> 2 steps per epoch
    assert {"val_top1", "val_loss"} <= set(evals[-1]) and "val_top5" not in evals[-1]  # 3 classes: no top-5
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["num_classes"] == 3 and cfg["data"]["labels_per_class"] == 4
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    assert (run / "classes.txt").read_text().split() == sorted(COLOURS)

    model = beit.load(run)
    assert model.cfg.num_classes == 3
    from safetensors.torch import load_file

    from beit.checkpoint import latest_checkpoint

    saved = load_file(latest_checkpoint(run) / "model.safetensors")
    torch.testing.assert_close(model.head.weight, saved["model.head.weight"])
    best = beit.load(run / "checkpoints" / "best")
    assert best(torch.randn(2, 3, 16, 16)).shape == (2, 3)

    # resuming takes the weights from the run: the --init checkpoint is not read again
    rc = main(["-q", "finetune", "--json", "--data", str(data), "--init", str(tmp_path / "gone"), "--out", str(run),
               "--labels-per-class", "4", "--steps", "6", "--batch-size", "6", "--workers", "0",
               "--device", "cpu", "model.img_size=16", "--resume"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 6


@pytest.mark.parametrize("method", ["mae", "ibot"])
def test_finetune_from_runs_without_relative_bias(tmp_path, method):
    """MAE/iBOT backbones have absolute positions only: fine-tuning keeps them (no empty relative tables)."""
    import beit
    from beit.cli import main

    data = make_colour_dataset(tmp_path / "data")
    pre = tmp_path / method
    small = {"mae": ["mae.decoder_dim=16", "mae.decoder_depth=1", "mae.decoder_heads=2"],
             "ibot": ["ibot.out_dim=32", "ibot.hidden_dim=32", "ibot.bottleneck_dim=16"]}
    assert main(["-q", "pretrain", "--method", method, "--data", str(data / "train"), "--out", str(pre),
                 "--steps", "2", "--batch-size", "4", "--workers", "0", "--precision", "fp32",
                 "model.img_size=16", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
                 *small[method]]) == 0
    run = tmp_path / "ft"
    assert main(["-q", "finetune", "--data", str(data), "--init", str(pre), "--out", str(run),
                 "--steps", "2", "--batch-size", "6", "--workers", "0", "model.img_size=16"]) == 0
    model = beit.load(run)
    assert not model.cfg.use_rel_pos_bias and not model.cfg.use_shared_rel_pos_bias
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, beit.load(pre).blocks[0].attn.qkv.weight,
                               rtol=0.1, atol=0.05)  # two fine-tuning steps move it only a little


def test_finetune_decodes_each_image_once_and_learns_the_same(tmp_path, capsys):
    """``data.decode_cache`` (auto: on for small folders) decodes the train and val images once into the run;
    the fine-tuning sees the same pixels, so its losses and evaluation equal those of a run without it."""
    from beit.cli import main

    data = make_colour_dataset(tmp_path / "data")
    pre = make_pretraining_run(tmp_path / "pre", data)
    runs = {}
    for mode in ("on", "off"):
        run = runs[mode] = tmp_path / f"ft_{mode}"
        rc = main(["-q", "finetune", "--json", "--data", str(data), "--init", str(pre), "--out", str(run),
                   "--labels-per-class", "4", "--steps", "4", "--batch-size", "6", "--workers", "0",
                   "--device", "cpu", "model.img_size=16", "train.log_every=1", f"data.decode_cache={mode}"])
        assert rc == 0
        capsys.readouterr()
    for split in ("train", "val"):
        assert list((runs["on"] / "decode_cache" / split).glob("decoded-*.u8"))
    assert not (runs["off"] / "decode_cache").exists()
    rows = {m: [json.loads(ln) for ln in (r / "metrics.jsonl").read_text().splitlines()] for m, r in runs.items()}
    assert [r.get("loss") for r in rows["on"]] == [r.get("loss") for r in rows["off"]]
    assert [r.get("val_top1") for r in rows["on"]] == [r.get("val_top1") for r in rows["off"]]
