"""``beit show mae``: what an MAE run reconstructs from a quarter of an image.

One PNG, four panels: original | masked (removed patches grey) | reconstruction | reconstruction with the
visible patches pasted back (the MAE paper's Figure 2 layout). With ``norm_pix_loss`` the decoder predicts
per-patch normalised pixels; each patch is mapped back with the true patch's mean and std, as the official
visualisation does.

Greyscale images (Fashion-MNIST in the demo) come out with a blue tint unless told apart, for this reason: a grey
image is three equal channels, each normalised with its own ImageNet mean and std, so channel B sits 0.3-0.4
above R everywhere in model space. ``norm_pix_loss`` normalises each patch over all its pixels and channels, so in a
flat patch (std ~0.16 from those offsets alone) the offsets are most of the target, and in a textured one (std ~1) they
are a small part of it. The decoder predicts one average offset pattern in these units; multiplied back by a
textured patch's large std, it turns into a strong blue-over-red shift (measured on the demo's MAE run: channel
means R 70 / G 83 / B 109 for an original of 86 / 86 / 86). The colour is the model's error on information the
image does not have, so for a greyscale input the reconstruction is shown in grey: the mean of its three
unnormalised channels (86.4 -> 87.2 on the same image).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..config import ConfigError, from_dict
from ..loading import run_weights
from .images import masked_view, normalize, pixel_mask, prepare_image, unnormalize

__all__ = ["is_greyscale", "load_mae_method", "mae_panels", "show_mae"]


def load_mae_method(run: str | Path):
    """The full MAE method (encoder + decoder) of a run or checkpoint directory, in eval mode."""
    from ..methods.mae import MAEMethod
    from ..tasks.pretrain import config_class

    config, weights = run_weights(run)
    cfg = from_dict(config_class(), config)
    if cfg.method != "mae":
        raise ConfigError(f"{run} is a {cfg.method!r} run; `beit show mae` needs an MAE pretraining run "
                          "(its decoder draws the reconstruction)")
    method = MAEMethod.build(cfg.model, cfg.mae)
    method.load_state_dict(weights)
    return method.eval()


@torch.no_grad()
def mae_panels(method, images01: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """``images01 (1, 3, H, W)`` in [0, 1] -> [original, masked, reconstruction, pasted], each (3, H, W)."""
    x = normalize(images01)
    n = method.encoder.patch_embed.num_patches
    noise = torch.rand(1, n, generator=torch.Generator().manual_seed(seed))
    recon, mask = method.reconstruct(x, noise)  # (1, 3, H, W) normalised, (1, N) True = removed
    recon01 = unnormalize(recon)
    if is_greyscale(images01):  # see the module docstring: any colour here is an artefact of the channel offsets
        recon01 = recon01.mean(dim=1, keepdim=True).expand_as(recon01)
    grid_mask = mask.view(1, *method.encoder.grid_size)  # (1, h, w)
    masked = masked_view(images01, grid_mask)
    pasted = torch.where(pixel_mask(grid_mask, images01.shape[-2:]), recon01, images01)
    return [t[0] for t in (images01, masked, recon01, pasted)]


def is_greyscale(images01: torch.Tensor) -> bool:
    """True if every image of ``(B, 3, H, W)`` has three equal channels (a grey picture loaded as RGB)."""
    return bool(torch.equal(images01[:, 0], images01[:, 1]) and torch.equal(images01[:, 1], images01[:, 2]))


def show_mae(run: str | Path, image: str | Path, out: str | Path, seed: int = 0, size: int = 192) -> Path:
    """Draw the four panels for ``image`` with the MAE run ``run`` into ``out`` (PNG); ``seed`` picks the mask.
    Panels are scaled up to ``size`` pixels (nearest neighbour, so patches stay visible)."""
    method = load_mae_method(run)
    panels = mae_panels(method, prepare_image(image, method.encoder.cfg.img_size)[None], seed)
    titles = ["original", f"masked {method.cfg.mask_ratio:.0%}", "reconstruction", "+ visible"]
    pad, top = 6, 18
    sheet = Image.new("RGB", (4 * size + 5 * pad, size + top + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (panel, title) in enumerate(zip(panels, titles)):
        arr = (panel.permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype("uint8")
        tile = Image.fromarray(arr).resize((size, size), Image.NEAREST)
        x0 = pad + k * (size + pad)
        sheet.paste(tile, (x0, top))
        draw.text((x0, 3), title, fill="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
