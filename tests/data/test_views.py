"""Two views from one crop: same content, same flip and jitter, own sizes; the per-sample pretraining dict."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from beit.data.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BeitPretrainTransform,
    TwoViewTransform,
    random_resized_crop_params,
)
from beit.masking import MaskGenerator, MaskingConfig

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _quadrants(size: int = 96) -> Image.Image:
    """Four distinct colours, one per quadrant, and a diagonal gradient so every crop looks different."""
    a = np.zeros((size, size, 3), dtype=np.uint8)
    h = size // 2
    a[:h, :h] = (230, 30, 30)
    a[:h, h:] = (30, 230, 30)
    a[h:, :h] = (30, 30, 230)
    a[h:, h:] = (230, 230, 30)
    ramp = (np.add.outer(np.arange(size), np.arange(size)) * 40 // (2 * size)).astype(np.uint8)
    a = a - np.minimum(a, ramp[..., None])
    return Image.fromarray(a)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unnorm(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def test_shapes_dtypes_ranges():
    t = TwoViewTransform(32, 16)
    patch, tok = t(_quadrants(), _g(0))
    assert patch.shape == (3, 32, 32) and patch.dtype == torch.float32
    assert tok.shape == (3, 16, 16) and tok.dtype == torch.float32
    assert float(tok.min()) >= 0.0 and float(tok.max()) <= 1.0  # tokenizer view: [0, 1], no map_pixels here
    pix = _unnorm(patch)
    assert float(pix.min()) > -1e-4 and float(pix.max()) < 1 + 1e-4  # patch view: mean/std normalised
    assert float(patch.min()) < -0.5  # ... and really normalised, not in [0, 1]


@pytest.mark.parametrize("jitter", [0.0, 0.4])
def test_both_views_show_the_same_crop(jitter):
    t = TwoViewTransform(64, 32, color_jitter=jitter)
    img = _quadrants()
    diffs, cross = [], []
    prev = None
    for s in range(20):
        patch, tok = t(img, _g(s))
        down = F.interpolate(_unnorm(patch)[None], size=(32, 32), mode="bilinear", antialias=True)[0]
        diffs.append(float((down - tok).abs().mean()))
        if prev is not None:
            cross.append(float((tok - prev).abs().mean()))
        prev = tok
    # same crop/flip/jitter: only resampling differences (edges between quadrants) remain
    assert max(diffs) < 0.015, diffs
    # while different samples really are different crops
    assert sum(cross) / len(cross) > 5 * max(diffs)


def test_flip_applies_to_both_views():
    a = np.zeros((40, 40, 3), dtype=np.uint8)
    a[:, :20] = (255, 0, 0)  # red left, blue right
    a[:, 20:] = (0, 0, 255)
    img = Image.fromarray(a)
    kw = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), color_jitter=0.0)
    for p, left_is_blue in ((1.0, True), (0.0, False)):
        patch, tok = TwoViewTransform(32, 16, hflip=p, **kw)(img, _g(0))
        for v in (_unnorm(patch), tok):
            w = v.shape[-1]
            left, right = v[:, :, : w // 4].mean((1, 2)), v[:, :, -w // 4:].mean((1, 2))
            assert (left[2] > left[0]) == left_is_blue
            assert (right[2] > right[0]) != left_is_blue


def test_same_jitter_on_both_views():
    t = TwoViewTransform(32, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, color_jitter=(0.8, 0.8, 0.8, 0.1))
    img = _quadrants(64)
    means = []
    for s in range(6):
        patch, tok = t(img, _g(s))
        pm, tm = _unnorm(patch).mean((1, 2)), tok.mean((1, 2))
        assert torch.allclose(pm, tm, atol=0.02), (pm, tm)
        means.append(tm)
    assert max(float((m - means[0]).abs().max()) for m in means[1:]) > 0.05  # the jitter does vary


def test_deterministic_under_generator_and_tensor_input():
    t = TwoViewTransform(32, 16)
    img = _quadrants()
    a, b = t(img, _g(5)), t(img, _g(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    as_tensor = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
    c = t(as_tensor, _g(5))
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    gray = t(img.convert("L"), _g(5))
    assert gray[0].shape == (3, 32, 32)
    with pytest.raises(TypeError):
        t(np.asarray(img), _g(0))


def test_crop_params_in_bounds():
    for s in range(200):
        top, left, h, w = random_resized_crop_params(50, 80, generator=_g(s))
        assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 80 and h > 0 and w > 0
    # an impossible aspect range falls back to the centred crop
    assert random_resized_crop_params(10, 100, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=_g(0)) == (0, 45, 10, 10)


def test_pretrain_transform_seeded_by_global_rng():
    views = TwoViewTransform(32, 16)
    tf = BeitPretrainTransform(views, MaskGenerator((8, 8), MaskingConfig(min_block=4)))
    img = _quadrants()
    torch.manual_seed(11)
    a = tf(img)
    torch.manual_seed(11)
    b = tf(img)
    assert set(a) == {"images", "tok_images", "mask"}
    assert a["images"].shape == (3, 32, 32) and a["tok_images"].shape == (3, 16, 16)
    assert a["mask"].shape == (8, 8) and a["mask"].dtype == torch.bool and 0 < int(a["mask"].sum()) <= 26
    for k in a:
        assert torch.equal(a[k], b[k])
    c = tf(img)  # the global RNG moved on: another sample
    assert not torch.equal(a["images"], c["images"])
    no_tok = BeitPretrainTransform(TwoViewTransform(32, None), MaskGenerator((8, 8)))(img)
    assert set(no_tok) == {"images", "mask"}


def test_batched_collate_equals_per_sample_transform():
    """The loader's path (uint8 samples, one batched finish) gives the per-sample path's numbers."""
    views = TwoViewTransform(32, 16, color_jitter=(0.4, 0.4, 0.4, 0.1))
    t = BeitPretrainTransform(views, MaskGenerator((8, 8), MaskingConfig(num_masked=20)))
    img = _quadrants()
    torch.manual_seed(3)
    single = [t(img) for _ in range(5)]
    collate = t.batched()
    torch.manual_seed(3)
    batch = collate([t(img) for _ in range(5)])
    for k in ("images", "tok_images", "mask"):
        torch.testing.assert_close(batch[k], torch.stack([s[k] for s in single]), atol=1e-6, rtol=0)
    assert set(batch) == {"images", "tok_images", "mask"}


def test_uint8_batches_finished_on_the_device_by_the_engine(tmp_path, make_image_folder):
    """``batched(on_device=True)``: the loader's batch stays uint8 (a quarter of the bytes to move) and the
    engine finishes it after the transfer: the same losses as the batch finished in the loader."""
    import dataclasses

    from beit.config import OptimConfig, TrainConfig
    from beit.data.folder import ImageFolder
    from beit.engine import train
    from beit.methods.mae import MAEConfig, MAEMethod
    from beit.models.presets import get_preset

    views = TwoViewTransform(32, None, color_jitter=(0.4, 0.4, 0.4, 0.1))
    t = BeitPretrainTransform(views, MaskGenerator((8, 8), MaskingConfig(num_masked=20)))
    split = t.batched(on_device=True)
    torch.manual_seed(3)
    samples = [t(_quadrants()) for _ in range(4)]
    raw = split(samples)
    assert raw["images"].dtype == torch.uint8 and "jitter" in raw
    for k, v in split.on_device(raw).items():
        torch.testing.assert_close(v, t.collate(samples)[k], atol=0, rtol=0)

    data = make_image_folder(classes=(), per_class=8)
    cfg = TrainConfig(steps=3, batch_size=4, num_workers=0, log_every=1, precision="fp32", device="cpu")
    losses = []
    for on_device in (False, True):
        torch.manual_seed(0)
        model_cfg = dataclasses.replace(get_preset("beit_tiny_patch4_32"), embed_dim=48, num_heads=3, depth=1)
        method = MAEMethod.build(model_cfg, MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2))
        ds = ImageFolder(data, transform=t)
        res = train(method, ds, train_cfg=cfg, optim_cfg=OptimConfig(), run_dir=tmp_path / f"run{on_device}",
                    collate_fn=t.batched(on_device=on_device))
        losses.append(res.last_metrics["loss"])
    assert losses[0] == losses[1]


def test_color_jitter_matches_torchvision_kernels():
    import torchvision.transforms.v2.functional as TF

    from beit.data.views import color_jitter

    x = torch.rand(2, 3, 8, 8, generator=_g(0))
    params = torch.tensor([[2, 0, 3, 1, 1.3, 0.7, 1.5, 0.05], [1, 3, 2, 0, 0.8, 1.2, 0.6, -0.1]], dtype=torch.float64)
    ops = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation, 3: TF.adjust_hue}
    got = color_jitter(x.clone(), params)
    for i in range(2):
        ref = x[i]
        for k in params[i, :4].long().tolist():
            ref = ops[k](ref, float(params[i, 4 + k]))
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=0)
