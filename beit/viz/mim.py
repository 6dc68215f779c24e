"""What a BEiT model predicts under a blockwise mask, seen through the tokenizer's decoder.

>>> from beit.viz.mim import show_mim
>>> show_mim("runs/pretrain", "runs/tokenizer", "cat.jpg", "mim.png", seed=0)

Panels: the image; the image with the masked patches greyed out; the tokenizer's decoding of the token
grid where the masked positions hold the model's predicted ids (unmasked positions keep the true ids); the
decoding of the true ids (the best the model could do). BEiT (arXiv 2106.08254, Sec. 2.3) predicts visual
tokens, not pixels, so the decoder is the only way to look at a prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..loading import load_tokenizer
from .attention import load_backbone
from .images import masked_view, normalize, prepare_image

__all__ = ["mim_predict", "show_mim"]


def _mask_generator(init: Any, grid: tuple[int, int]):
    """The run's masking settings (its ``beit`` config section) when ``init`` is a run, else BEiT's defaults."""
    from ..masking import MaskGenerator, MaskingConfig
    from ..methods.beit import BEiTConfig

    cfg = MaskingConfig()
    if isinstance(init, (str, Path)):
        try:
            from ..config import from_dict
            from ..runs import RunDir

            raw = RunDir(init).config().get("beit")
            if isinstance(raw, dict):
                cfg = from_dict(BEiTConfig, raw, prefix="beit.").masking_config()
        except Exception:  # noqa: BLE001 - not a run (HF/timm file): the defaults are the paper's
            pass
    return MaskGenerator(grid, cfg)


@torch.no_grad()
def mim_predict(init: Any, tokenizer: Any, image: Any, seed: int = 0,
                mask: torch.Tensor | None = None) -> dict[str, torch.Tensor | float]:
    """Run masked image modeling on one image.

    Returns ``image`` (3, S, S) in [0, 1]; ``mask`` (h, w) bool, True = masked; ``true_ids`` / ``pred_ids``
    (h, w) long (``pred_ids`` = true ids with the masked positions replaced by the model's argmax);
    ``decoded_true`` / ``decoded_pred`` (3, S', S') in [0, 1]; ``accuracy`` on the masked positions.
    ``init``: a model or run with an MIM head; ``tokenizer``: a Tokenizer or its path.
    """
    from ..config import ConfigError
    model = load_backbone(init)
    if model.lm_head is None:
        raise ConfigError(f"{init}: no masked-image-modeling head (needs a BEiT run with visual-token targets)")
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    tok.eval()
    if tuple(tok.grid_size) != tuple(model.grid_size):
        raise ConfigError(f"the tokenizer's {tuple(tok.grid_size)} token grid differs from the model's "
                          f"{tuple(model.grid_size)} patch grid")
    if tok.vocab_size != model.lm_head.out_features:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} visual tokens, the model predicts "
                          f"{model.lm_head.out_features}")
    S = model.cfg.img_size
    x01 = prepare_image(image, S)  # (3, S, S)
    # the tokenizer sees the same crop at its own resolution, as in pretraining (BEiT's second view)
    tok_view = F.interpolate(x01[None], size=(tok.cfg.img_size,) * 2, mode="bicubic", align_corners=False,
                             antialias=True).clamp(0, 1)  # (1, 3, s, s)
    if mask is None:
        mask = _mask_generator(init, model.grid_size)(torch.Generator().manual_seed(seed))  # (h, w)
    mask = mask.bool()
    device = next(model.parameters()).device
    true_ids = tok.encode(tok_view.to(next(tok.parameters()).device)).cpu()  # (1, h, w)
    logits = model.forward_mim(normalize(x01)[None].to(device), mask[None].to(device))  # (M, V), row-major
    pred = logits.argmax(-1).cpu()
    pred_ids = true_ids.clone()
    pred_ids[mask[None]] = pred  # same row-major order as the logits
    n = int(mask.sum())
    acc = float((pred == true_ids[mask[None]]).float().mean()) if n else 0.0
    decoded = tok.decode(torch.cat([pred_ids, true_ids]).to(next(tok.parameters()).device)).cpu()
    return {"image": x01, "mask": mask, "true_ids": true_ids[0], "pred_ids": pred_ids[0],
            "decoded_pred": decoded[0], "decoded_true": decoded[1], "accuracy": acc, "num_masked": n}


def show_mim(init: Any, tokenizer: Any, image: Any, out: str | Path, seed: int = 0, dpi: int = 120) -> dict:
    """Save the four-panel PNG (image | masked | decode(predicted at masked) | decode(true)); returns the
    numbers of :func:`mim_predict` without the tensors (``accuracy``, ``num_masked``) plus ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = mim_predict(init, tokenizer, image, seed=seed)
    panels = [
        (r["image"].permute(1, 2, 0).numpy(), "image"),
        (masked_view(r["image"][None], r["mask"][None])[0].permute(1, 2, 0).numpy(), f"mask ({r['num_masked']} patches)"),
        (r["decoded_pred"].permute(1, 2, 0).numpy(), f"predicted ids (acc {100 * r['accuracy']:.0f}%)"),
        (r["decoded_true"].permute(1, 2, 0).numpy(), "true ids"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(8.4, 2.4))
    for ax, (img, title) in zip(axes, panels):
        ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return {"out": str(out), "accuracy": r["accuracy"], "num_masked": r["num_masked"]}
