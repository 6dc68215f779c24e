"""docs/architecture.md's recipe "add a tokenizer objective", followed in this file alone: an objective
for the Gumbel quantizer trained on reconstruction only (no KL term, no temperature schedule) subclasses
``TokenizerObjective``, takes its quantizer's place in ``OBJECTIVES`` (the recipe's one line in
``tokenizers/train.py``, done here with ``monkeypatch``), trains through ``train_tokenizer`` and gives a
tokenizer that loads and encodes.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from beit.loading import load_tokenizer
from beit.models.tokenizer import stats_to_images
from beit.tokenizers import OBJECTIVES, build_objective, train_tokenizer
from beit.tokenizers.base import TokenizerObjective, batch_images, code_perplexity, psnr, recon_loss

TINY = ["model.img_size=16", "model.vocab_size=32", "model.n_hid=8", "model.n_groups=2", "model.n_init=8",
        "objective.recon=mse", "train.batch_size=4", "train.num_workers=0", "train.device=cpu",
        "train.precision=fp32", "train.log_every=1", "train.ckpt_every=100"]


class ReconstructionOnly(TokenizerObjective):
    """Hard Gumbel samples (straight-through) and the reconstruction loss alone."""

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch_images(batch)  # (B, 3, H, W) in [0, 1]
        logits = self.tokenizer.encode_logits(x)  # (B, K, h, w)
        z = F.gumbel_softmax(logits.float(), tau=1.0, hard=True, dim=1)
        stats = self.tokenizer.decoder(z.to(logits.dtype))  # (B, 2C, H, W)
        loss = recon_loss(stats, x, self.cfg)
        with torch.no_grad():
            metrics = {"recon": float(loss), "psnr": float(psnr(stats_to_images(stats, x.shape[1]), x).mean()),
                       "perplexity": code_perplexity(logits.argmax(1), logits.shape[1])}
        return loss, metrics


def test_new_objective_trains_through_the_tokenizer_run(tmp_path, make_image_folder, monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "gumbel", ReconstructionOnly)
    data = make_image_folder(tmp_path / "train", classes=(), per_class=12, size=16, seed=0)
    val = make_image_folder(tmp_path / "val", classes=(), per_class=4, size=16, seed=1)
    run = train_tokenizer(data, tmp_path / "tok", preset=None, overrides=[*TINY, "train.steps=4"], val_dir=val)

    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "recon" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4] and not any("kl" in r for r in rows)
    assert all(r["loss"] == r["recon"] for r in train_rows)  # the loss is this objective's, not the dVAE's
    assert "psnr" in json.loads((run / "eval.json").read_text())
    tok = load_tokenizer(run)
    assert isinstance(build_objective(tok), ReconstructionOnly)
    ids = tok.encode(torch.rand(2, 3, 16, 16))
    assert ids.shape == (2, 8, 8) and ids.dtype == torch.long
