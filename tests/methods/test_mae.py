"""MAE: masking by sorted noise, the loss against a hand computation, visible-only encoder, exact resume after
SIGKILL, a falling loss on a tiny folder, the saved encoder loading as a plain backbone, the picture."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import beit
from beit import checkpoint as ckpt
from beit.config import ModelConfig
from beit.loading import read_checkpoint
from beit.methods.mae import MAEConfig, MAEMethod, mae_loss, random_masking, shuffle, unpatchify, unshuffle
from beit.models.vit import VisionTransformer
from tests.helpers import pretrain_driver
from tests.helpers.paths import ROOT
from tests.helpers.pretrain_driver import TINY, pretrain

DRIVER = [sys.executable, "-m", "tests.helpers.pretrain_driver"]


def tiny_mae(norm_pix: bool = True, img: int = 8, patch: int = 4, ratio: float = 0.75) -> MAEMethod:
    torch.manual_seed(0)
    mcfg = ModelConfig(img_size=img, patch_size=patch, embed_dim=16, depth=1, num_heads=2, use_sincos_pos_emb=True,
                       use_shared_rel_pos_bias=False, layer_scale_init=0.0, drop_path_rate=0.0)
    return MAEMethod.build(mcfg, MAEConfig(mask_ratio=ratio, decoder_dim=8, decoder_depth=1, decoder_heads=2,
                                           norm_pix_loss=norm_pix))


def test_random_masking_counts_and_order():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(3, 64, generator=g)
    ids_keep, ids_restore, mask = random_masking(noise, 0.75)
    assert ids_keep.shape == (3, 16) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [48, 48, 48]
    for b in range(3):  # the kept patches are the 16 smallest noises, and exactly those are unmasked
        assert set(ids_keep[b].tolist()) == set(noise[b].argsort()[:16].tolist())
        assert set((~mask[b]).nonzero().flatten().tolist()) == set(ids_keep[b].tolist())
    x = torch.randn(3, 64, 5)
    ids_shuffle = noise.argsort(1)
    assert torch.equal(unshuffle(shuffle(x, ids_shuffle), ids_restore), x)
    assert torch.equal(shuffle(x, ids_shuffle)[:, :16], shuffle(x, ids_keep))


def _hand_patch(img: torch.Tensor, i: int, j: int, p: int) -> list[float]:
    """Pixels of patch (i, j) ordered (row, col, channel), by explicit loops."""
    return [float(img[c, i * p + r, j * p + s]) for r in range(p) for s in range(p) for c in range(img.shape[0])]


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_equals_hand_computation(norm_pix):
    m = tiny_mae(norm_pix)
    torch.manual_seed(1)
    images = torch.randn(2, 3, 8, 8)
    noise = torch.rand(2, 4)
    loss, _ = m({"images": images, "noise": noise})
    latent, ids_restore, mask = m.forward_encoder(images, noise)
    pred = m.forward_decoder(latent, ids_restore).detach()  # (2, 4, 48)
    total, count = 0.0, 0
    for b in range(2):
        for n in range(4):
            if not mask[b, n]:
                continue
            t = _hand_patch(images[b], n // 2, n % 2, 4)
            if norm_pix:
                mu = sum(t) / len(t)
                var = sum((v - mu) ** 2 for v in t) / (len(t) - 1)
                t = [(v - mu) / (var + 1e-6) ** 0.5 for v in t]
            total += sum((float(pred[b, n, k]) - t[k]) ** 2 for k in range(len(t))) / len(t)
            count += 1
    assert count == 2 * 3  # int(4 * 0.25) = 1 kept of 4
    assert float(loss.detach()) == pytest.approx(total / count, rel=1e-5)
    # unpatchify inverts the patch order used by the target
    from beit.methods.beit import patchify

    assert torch.equal(unpatchify(patchify(images, 4), 4), images)
    assert float(mae_loss(pred, pred, mask)) == 0.0


def test_encoder_sees_only_visible_patches():
    m = tiny_mae(img=16, patch=4)  # 16 patches, 4 kept
    seen = []
    m.encoder.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    images = torch.randn(2, 3, 16, 16, requires_grad=True)
    noise = torch.rand(2, 16)
    latent, ids_restore, mask = m.forward_encoder(images, noise)
    assert seen == [torch.Size([2, 1 + 4, 16])] and latent.shape == (2, 5, 16)
    # the reconstruction depends on the visible pixels only
    m.forward_decoder(latent, ids_restore).sum().backward()
    g = images.grad.abs().sum(1)  # (2, 16, 16)
    per_patch = g.reshape(2, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(2, 16, 16).sum(-1)  # (2, N)
    assert (per_patch[mask] == 0).all() and (per_patch[~mask] > 0).all()
    loss, _ = m({"images": images.detach(), "noise": noise})
    m.zero_grad()
    loss.backward()
    assert m.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert m.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert m.mask_token.grad.abs().sum() > 0 and m.decoder_pred.weight.grad.abs().sum() > 0


def test_decoder_reuses_backbone_block():
    from beit.models.vit import Block

    m = tiny_mae()
    assert all(type(b) is Block for b in m.decoder_blocks)
    assert m.encoder.rel_pos_bias is None and m.encoder.blocks[0].gamma_1 is None
    assert not any(n.startswith("encoder.") and "mask_token" in n for n, _ in m.named_parameters())


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _drive(run: Path, data: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([*DRIVER, str(run), "--data", str(data), *args], env=env, capture_output=True, text=True,
                          check=check, timeout=300)


def test_resume_after_sigkill_is_exact(tmp_path, make_image_folder):
    data = make_image_folder(classes=(), per_class=8)
    full, cut = tmp_path / "full", tmp_path / "cut"
    # the reference run in this process (one thread, as the driver's), the interrupted one in subprocesses
    pretrain_driver.main([str(full), "--data", str(data), "--preset", "mae_tiny_patch4_32", "--steps", "8"])
    killed = _drive(cut, data, "--preset", "mae_tiny_patch4_32", "--steps", "8", "--kill-at", "5", check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert ckpt.latest_checkpoint(cut).name == "step_00000003"
    _drive(cut, data, "--preset", "mae_tiny_patch4_32", "--steps", "8", "--resume")
    a, b = _losses(full), _losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    wa, _, _ = read_checkpoint(ckpt.latest_checkpoint(full))
    wb, _, _ = read_checkpoint(ckpt.latest_checkpoint(cut))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_trains_and_saves_a_plain_backbone(tmp_path, make_image_folder):
    data = make_image_folder(classes=(), per_class=16)
    run = tmp_path / "run"
    ov = [*TINY["mae"], "train.steps=40", "train.batch_size=8", "train.num_workers=0", "train.log_every=1",
          "train.precision=fp32", "train.device=cpu", "optim.lr=2e-3", "optim.warmup_steps=2"]
    res, method = pretrain(str(run), str(data), "mae_tiny_patch4_32", ov)
    losses = [v for _, v in sorted(_losses(run).items())]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    # every downstream command loads the encoder as a plain VisionTransformer
    model = beit.load(run)
    assert isinstance(model, VisionTransformer) and model.mask_token is None and model.cfg.use_sincos_pos_emb
    enc = method.encoder.state_dict()
    assert all(torch.equal(v, enc[k].cpu()) for k, v in model.state_dict().items())
    # the picture: original | masked | reconstruction | reconstruction + visible
    from beit.viz.mae import show_mae

    img = data / "0.png"
    out = show_mae(run, img, tmp_path / "mae.png", seed=0)
    pic = Image.open(out)
    assert pic.width > 3 * pic.height  # four panels side by side


def test_greyscale_reconstruction_is_shown_grey_and_colour_left_alone():
    """A grey image's reconstruction comes back tinted (the per-channel ImageNet offsets inside the per-patch
    normalised target, beit/viz/mae.py): shown as the grey mean of its channels; a colour image is untouched."""
    from beit.viz.images import normalize, unnormalize
    from beit.viz.mae import is_greyscale, mae_panels

    method = tiny_mae().eval()
    g = torch.Generator().manual_seed(1)
    grey = torch.rand(1, 1, 8, 8, generator=g).expand(1, 3, 8, 8).contiguous()
    colour = torch.rand(1, 3, 8, 8, generator=g)
    assert is_greyscale(grey) and not is_greyscale(colour)
    noise = torch.rand(1, 4, generator=torch.Generator().manual_seed(0))
    raw = unnormalize(method.reconstruct(normalize(grey), noise)[0])[0]  # what the model gives, per channel
    assert (raw[0] - raw[2]).abs().max() > 1e-3  # tinted: the channels differ
    shown = mae_panels(method, grey, seed=0)[2]
    torch.testing.assert_close(shown, raw.mean(0, keepdim=True).expand(3, -1, -1))
    raw_c = unnormalize(method.reconstruct(normalize(colour), noise)[0])[0]
    torch.testing.assert_close(mae_panels(method, colour, seed=0)[2], raw_c)
