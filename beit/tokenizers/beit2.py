"""Convert an official BEiT v2 VQ-KD tokenizer checkpoint (unilm ``beit2/modeling_vqkd.py``) to a
:class:`beit.models.vqkd.VQKDTokenizer` (``beit tokenizer convert-beit2 CKPT --out DIR``).

The official ``VQKD`` module holds ``encoder`` and ``decoder`` (``modeling_finetune.VisionTransformer`` with
mean pooling: the per-token norm is ``fc_norm``, the classifier an ``Identity``), ``encode_task_layer`` /
``decode_task_layer`` (Linear-Tanh-Linear), and ``quantize`` (``NormEMAVectorQuantizer``: the codebook
``quantize.embedding.weight`` and EMA statistics). The released files wrap the state dict in ``model``; the
teacher (``teacher_model.*``) and ``scaling_layer.*`` are dropped, as the official loader does. The block
names are this toolkit's already; only ``fc_norm`` -> ``norm`` and the codebook are renamed. The codebook is
l2-normalised (its rows are unit vectors after any EMA step): the nearest code is then the one of highest
cosine (paper Eq. 1), whatever the stored norms. Images go in as ``2x - 1`` (the official ``process_type``
``default``). The file is read by :func:`beit.loading.read_official` (``torch.load(weights_only=True)``):
nothing is unpickled but tensors and plain containers.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..checkpoint_io import CheckpointError, NonFiniteError
from ..loading import read_official
from ..models.tokenizer import TOKENIZER_FILE, save_tokenizer
from ..models.vqkd import VQKDConfig, VQKDTokenizer, l2norm

__all__ = ["convert_beit2", "official_vqkd_to_ours"]

_DROPPED = ("teacher_model.", "scaling_layer.", "loss", "quantize.cluster_size", "quantize.embedding.cluster_size",
            "quantize.embedding.embed_avg", "quantize.embedding.initted", "encoder.head.", "decoder.head.")


def _depth(sd: dict[str, torch.Tensor], part: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(rf"{part}\.blocks\.(\d+)\.", k))}
    if not idx:
        raise CheckpointError(f"no {part}.blocks.* weights: not a BEiT v2 VQ-KD checkpoint")
    return max(idx) + 1


def official_vqkd_to_ours(sd: dict[str, torch.Tensor], encoder_heads: int = 0,
                          decoder_heads: int = 0) -> tuple[VQKDConfig, dict[str, torch.Tensor]]:
    """(config, state dict in our names) of an official VQ-KD state dict; heads default to width / 64
    (ViT-B: 12), the only size the weights do not tell."""
    need = ("encoder.patch_embed.proj.weight", "quantize.embedding.weight", "encode_task_layer.2.weight",
            "decoder.patch_embed.proj.weight", "decode_task_layer.2.weight", "encoder.pos_embed")
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"not a BEiT v2 VQ-KD checkpoint: no {', '.join(missing)}")
    enc_w = sd["encoder.patch_embed.proj.weight"]  # (D_enc, C, p, p)
    dec_w = sd["decoder.patch_embed.proj.weight"]  # (D_dec, code_dim, 1, 1)
    vocab, code_dim = sd["quantize.embedding.weight"].shape
    n = sd["encoder.pos_embed"].shape[1] - 1
    grid = int(round(n**0.5))
    if grid * grid != n:
        raise CheckpointError(f"encoder.pos_embed has {n} patch positions: not a square grid")
    d_enc, d_dec = int(enc_w.shape[0]), int(dec_w.shape[0])
    cfg = VQKDConfig(
        img_size=grid * int(enc_w.shape[-1]), in_chans=int(enc_w.shape[1]), patch_size=int(enc_w.shape[-1]),
        vocab_size=int(vocab), embed_dim=int(code_dim), encoder_dim=d_enc, encoder_depth=_depth(sd, "encoder"),
        encoder_heads=encoder_heads or max(1, d_enc // 64), decoder_dim=d_dec, decoder_depth=_depth(sd, "decoder"),
        decoder_heads=decoder_heads or max(1, d_dec // 64), target_dim=int(sd["decode_task_layer.2.weight"].shape[0]),
        input_norm="minus_one_one")
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith(_DROPPED):
            continue
        if k == "quantize.embedding.weight":
            out["codebook"] = l2norm(v.float())
            continue
        out[re.sub(r"^(encoder|decoder)\.fc_norm\.", r"\1.norm.", k)] = v
    return cfg, out


def convert_beit2(path: str | Path, out_dir: str | Path, *, encoder_heads: int = 0, decoder_heads: int = 0,
                  overwrite: bool = False) -> Path:
    """Official ``vqkd_*.pth`` -> ``out_dir/tokenizer.safetensors`` (refuses to replace one unless ``overwrite``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    target = Path(out_dir) if Path(out_dir).suffix == ".safetensors" else Path(out_dir) / TOKENIZER_FILE
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target} exists; pass --overwrite to replace it")
    try:
        obj = read_official(path)
    except NonFiniteError:
        raise
    except CheckpointError as e:  # a pickle with code in it, or not a torch file at all
        why = str(e).splitlines()[0].removeprefix(f"{path}: ")
        raise CheckpointError(f"{path}: cannot read it as plain tensors ({why[:160]})") from None
    if isinstance(obj, dict):
        obj = obj.get("model", obj.get("state_dict", obj))
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path}: no state dict of tensors inside")
    cfg, sd = official_vqkd_to_ours(obj, encoder_heads, decoder_heads)
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: non-finite weights in {', '.join(bad[:3])}")
    tok = VQKDTokenizer(cfg)
    try:
        tok.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit a VQ-KD tokenizer ({str(e).splitlines()[1][:200]})") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    return save_tokenizer(tok.eval(), target)
