"""BEiT masked image modeling: a batch of (patch view, tokenizer view, mask) -> loss and metrics.

BEiT (arXiv 2106.08254, Sec. 2.3, Eq. 1): a frozen tokenizer turns the tokenizer view into visual tokens
``z``; the backbone sees the patch view with the blockwise-masked patches replaced by [MASK] and predicts
``z`` at the masked positions, ``loss = CE(logits[mask], z[mask])``. The MIM head runs on masked positions
only (HF ``BeitForMaskedImageModeling`` runs it on every patch, then drops most of the logits).

Ablations of Table 4 in the paper: ``target=pixels`` regresses the masked patches' pixels instead of
visual tokens (linear head ``D -> p*p*3``, MSE), ``predict=all`` takes the loss over every position, and
``masking=random`` replaces blockwise masking with uniform masking. ``target=teacher`` regresses a frozen
teacher's patch features at the masked positions (``1 - cos``, head ``D -> C``): BEiT v2's natural ablation,
the teacher's knowledge without the quantisation of a VQ-KD tokenizer.

BEiT v2 (arXiv 2208.06366): the tokenizer may be a VQ-KD tokenizer (:mod:`beit.models.vqkd`; same ``encode``),
and ``patch_aggregation=true`` adds the shallow [CLS] head of :mod:`beit.methods.aggregation` with its own
masked-token loss; the head is a submodule of this method, never of the backbone ``beit.load`` returns.

The tokenizer is frozen and is not part of this module's parameters or state dict: it is held as a plain
attribute, not a registered submodule. That keeps it out of ``parameters()`` (optimizer, DDP, gradient
clipping), ``state_dict()`` (run checkpoints hold only what is trained; the tokenizer has its own file)
and ``train()`` (it stays in eval mode). The price is that ``.to(device)`` does not move it, so
``forward`` moves it to the batch's device on first use. The tokenizer is a
:class:`beit.models.tokenizer.Tokenizer` or any object with its ``encode`` (images in [0, 1] -> ids).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import recipes
from ..config import ConfigError, ModelConfig, check_fields, replace
from ..data.views import BeitPretrainTransform, TwoViewTransform
from ..masking import MaskGenerator, MaskingConfig
from ..models.tokenizer import Tokenizer
from ..models.vqkd import VQKDTokenizer
from .aggregation import PatchAggregationHead, aggregation_block
from .base import Method
from .pixels import patchify, pixel_targets
from .registry import register
from .token_targets import PRECISIONS, PrecisionChoice, SideStream, encode_ids, resolve_precision

__all__ = ["BEiTConfig", "BEiTMethod", "build_pretrain_transform", "patchify"]

log = logging.getLogger("beit")


@dataclass
class BEiTConfig:
    """BEiT pretraining knobs (paper Sec. 2.5, Appendix B, Table 4 ablations)."""

    masking: str = "block"  # block | random
    mask_ratio: float = 0.4  # masked fraction of the patches: round(ratio * N)
    num_masked: int | None = None  # overrides mask_ratio when set (official 224px: 75 of 196)
    min_block: int = 16  # smallest block, in patches
    max_block: int | None = None  # largest block; None: the remaining budget (official)
    min_aspect: float = 0.3
    target: str = "tokens"  # tokens (visual tokens, CE) | pixels (raw patch pixels, MSE) | teacher (its features, cos)
    teacher: str = ""  # target=teacher: the backbone whose patch features are regressed (anything beit.load reads)
    teacher_block: int = -1  # target=teacher: its block (0-based, -1 the last; its final norm applied)
    predict: str = "masked"  # masked: loss on masked positions only | all: every position
    norm_pix: bool = False  # target=pixels: normalise each target patch by its own mean/std
    # the shared crop of both views
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.4
    patch_interp: str = "bicubic"
    tokenizer_interp: str = "lanczos"
    # BEiT v2 patch aggregation (methods/aggregation.py): a 2-block [CLS] head on the patch tokens of block
    # patch_aggregation_block (0-based; None: 3/4 of the depth, the paper's 9 of 12), own MIM loss, dropped after
    patch_aggregation: bool = False
    patch_aggregation_block: int | None = None
    patch_aggregation_depth: int = 2
    # the frozen tokenizer's encode (methods/token_targets.py): its encoder body in fp32 | bf16 | fp16 (CUDA), or
    # auto (fp32 on CPU; on CUDA fp16 if >= tokenizer_agreement of the first batch's ids equal fp32's, else
    # fp32); the code head and argmax are fp32 in every case. tokenizer_overlap: on CUDA, encode on a side
    # stream while the student's forward runs (the same numbers as the serial run)
    tokenizer_precision: str = "auto"
    tokenizer_agreement: float = 0.99
    tokenizer_overlap: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "beit", {"hflip": "prob", "color_jitter": "nonneg", "crop_scale crop_ratio": "positive"})
        if self.target not in ("tokens", "pixels", "teacher"):
            raise ConfigError(f"target must be 'tokens', 'pixels' or 'teacher', got {self.target!r}")
        if self.target == "teacher" and self.predict != "masked":
            raise ConfigError("beit.target=teacher predicts the masked positions only (beit.predict=masked)")
        if self.predict not in ("masked", "all"):
            raise ConfigError(f"predict must be 'masked' or 'all', got {self.predict!r}")
        self.masking_config()  # validates the masking fields
        if self.patch_aggregation and (self.target != "tokens" or self.predict != "masked"):
            raise ConfigError("beit.patch_aggregation needs beit.target=tokens and beit.predict=masked")
        check_fields(self, "beit", {"patch_aggregation_depth": "size", "tokenizer_agreement": "prob"})
        if self.tokenizer_precision not in ("auto", *PRECISIONS):
            raise ConfigError(f"beit.tokenizer_precision must be auto, fp32, bf16 or fp16, got "
                              f"{self.tokenizer_precision!r}")

    def masking_config(self) -> MaskingConfig:
        return MaskingConfig(
            kind=self.masking, ratio=self.mask_ratio, num_masked=self.num_masked, min_block=self.min_block,
            max_block=self.max_block, min_aspect=self.min_aspect,
        )


def build_pretrain_transform(
    cfg: BEiTConfig, model_cfg: ModelConfig, tokenizer_img_size: int | None
) -> BeitPretrainTransform:
    """Per-sample transform for this method: image -> ``{"images", "tok_images", "mask"}``.

    ``tokenizer_img_size`` is the tokenizer's input resolution (112 for DALL-E at 224 / 16); ``None``
    (or ``target=pixels``) leaves ``tok_images`` out.
    """
    tok_size = None if cfg.target == "pixels" else tokenizer_img_size
    if cfg.target == "tokens" and tok_size is None:
        raise ConfigError("target=tokens needs the tokenizer's input size (tokenizer_img_size)")
    views = TwoViewTransform(
        model_cfg.img_size, tok_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, hflip=cfg.hflip,
        color_jitter=cfg.color_jitter, patch_interp=cfg.patch_interp, tokenizer_interp=cfg.tokenizer_interp,
    )
    return BeitPretrainTransform(views, MaskGenerator(model_cfg.grid_size, cfg.masking_config()))


class BEiTMethod(Method):
    """``forward(batch) -> (loss, {"loss", "mlm_acc"})`` for the engine.

    ``batch``: ``images`` (B, 3, H, W) normalised patch view; ``mask`` (B, h, w) or (B, N) bool,
    True = masked; ``tok_images`` (B, 3, h', w') in ``[0, 1]`` (``target=tokens`` only).
    ``model``: a :class:`beit.models.vit.VisionTransformer` with ``vocab_size`` = the tokenizer's vocabulary
    (``target=tokens``) or with a [MASK] embedding (``target=pixels``).
    """

    state_prefix = "model."  # the backbone's weights in this module's state dict

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None = None, cfg: BEiTConfig | None = None):
        super().__init__()
        self.cfg = cfg if cfg is not None else BEiTConfig()
        self.model = model
        mcfg = getattr(model, "cfg", None)
        self.patch_size = int(getattr(mcfg, "patch_size", 0) or model.patch_embed.proj.kernel_size[0])
        if self.cfg.target == "tokens":
            if tokenizer is None:
                raise ConfigError("BEiT with target=tokens needs a tokenizer")
            vocab = getattr(tokenizer, "vocab_size", None)
            model_vocab = getattr(mcfg, "vocab_size", None)
            if vocab is not None and model_vocab is not None and int(vocab) != int(model_vocab):
                raise ConfigError(f"model.vocab_size={model_vocab} differs from the tokenizer's vocabulary {vocab}")
            self.pixel_head = None
        elif self.cfg.target == "teacher":
            self.pixel_head = None  # the feature head comes with the teacher (attach_teacher)
        else:
            embed_dim = int(getattr(mcfg, "embed_dim", 0) or model.cls_token.shape[-1])
            self.pixel_head = nn.Linear(embed_dim, self.patch_size**2 * 3)
            nn.init.trunc_normal_(self.pixel_head.weight, std=0.02)
            nn.init.zeros_(self.pixel_head.bias)
        if tokenizer is not None and isinstance(tokenizer, nn.Module):
            tokenizer.eval()
            tokenizer.requires_grad_(False)
        # not registered: see the module docstring
        self.__dict__["tokenizer"] = tokenizer
        self.__dict__["teacher"] = None
        self.tokenizer_choice: PrecisionChoice | None = None  # resolved on the first batch (token_targets.py)
        self._side = SideStream(self.cfg.tokenizer_overlap)
        self.feature_head: nn.Linear | None = None
        self.aggregation = None
        if self.cfg.patch_aggregation:  # a submodule of the method, not the backbone: beit.load never returns it
            block = aggregation_block(self.cfg.patch_aggregation_block, len(model.blocks))
            self.aggregation = PatchAggregationHead(model, block, self.cfg.patch_aggregation_depth)

    @classmethod
    def build(
        cls, model_cfg: ModelConfig, tokenizer: Tokenizer | None = None, cfg: BEiTConfig | None = None
    ) -> BEiTMethod:
        """Backbone from ``model_cfg`` with the head this method needs (vocab from the tokenizer)."""
        from ..models.vit import VisionTransformer

        cfg = cfg if cfg is not None else BEiTConfig()
        if cfg.target == "tokens":
            vocab = getattr(tokenizer, "vocab_size", None) or model_cfg.vocab_size
            if not vocab:
                raise ConfigError("target=tokens needs model.vocab_size or a tokenizer with vocab_size")
            model_cfg = replace(model_cfg, vocab_size=int(vocab), num_classes=0)
        else:
            model_cfg = replace(model_cfg, vocab_size=0, use_mask_token=True, num_classes=0)
        return cls(VisionTransformer(model_cfg), tokenizer, cfg)

    # ------------------------------------------------------------------------------------------ targets

    @property
    def teacher_request(self) -> tuple[str, int] | None:
        """``(path, block)`` of the teacher ``target=teacher`` needs and has not got yet: the pretraining task
        loads it (loading a backbone is a layer above the methods) and hands it to :meth:`attach_teacher`."""
        if self.cfg.target != "teacher" or self.__dict__["teacher"] is not None:
            return None
        return (self.cfg.teacher, self.cfg.teacher_block)

    def attach_teacher(self, teacher: Any) -> None:
        """``target=teacher``: the frozen teacher (``features(images in [0, 1], grid) -> (B, N, C)`` float32 and
        ``dim``; :class:`beit.tokenizers.vqkd.Teacher`), and the regression head ``D -> C`` it implies. Call it
        before training: the head's parameters must be in the optimiser."""
        self.__dict__["teacher"] = teacher  # not registered, like the tokenizer
        head = nn.Linear(self.model.embed_dim, int(teacher.dim))
        nn.init.trunc_normal_(head.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.zeros_(head.bias)
        self.feature_head = head.to(self.model.cls_token.device)

    @torch.no_grad()
    def visual_tokens(self, tok_images: torch.Tensor) -> torch.Tensor:
        """Frozen tokenizer: ``(B, 3, h', w')`` in [0, 1] -> ``(B, N)`` int64 ids, whatever the step's autocast:
        the encoder body in ``beit.tokenizer_precision`` (resolved on the first batch, :attr:`tokenizer_choice`),
        the code head and argmax in fp32. ``fp32`` (``auto`` on CPU) is the exact encode: a bf16 encode changed
        1-6% of a trained ``vq_32``'s ids with bf16 code distances, ~1% with fp32 ones, and 2.5% of a
        ``vq_32_small``'s with the fp32 head (bench/tokenizer_encode.py); the documented CPU results were made with
        fp32's targets. The encode runs channels-last (docs/notebook/2026-11-cpu-speed.md)."""
        tok = self.tokenizer
        if isinstance(tok, nn.Module):
            p = next(tok.parameters(), None)
            if p is not None and p.device != tok_images.device:
                tok.to(tok_images.device)
            if tok.training:
                tok.eval()
        choice = self.tokenizer_choice
        if choice is None:  # the first batch: the range check and the precision (auto may compare it with fp32)
            choice, ids = resolve_precision(self.cfg.tokenizer_precision, self.cfg.tokenizer_agreement, tok.encode,
                                            tok_images)
            self.tokenizer_choice = choice
            log.info("tokenizer precision: %s (%s)", choice.name, choice.reason)
        else:
            # the images were checked for [0, 1] on the first batch: no host sync per step for it
            checked = isinstance(tok, (Tokenizer, VQKDTokenizer))
            encode = (lambda x: tok.encode(x, check_range=False)) if checked else tok.encode
            ids = encode_ids(encode, tok_images, choice.dtype)
        return ids.flatten(1).long()  # (B, N)

    def _start_targets(self, tok_images: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start the encode of the targets (on the side stream on CUDA after the first batch); returns the function
        that gives the ids once the loss needs them."""
        if self.tokenizer_choice is None or not self._side.active(tok_images.device):
            ids = self.visual_tokens(tok_images)
            return lambda: ids
        return self._side.start(self.visual_tokens, tok_images)

    def _forward_aggregated(self, images: torch.Tensor, mask: torch.Tensor, targets: Callable[[], torch.Tensor]
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MIM loss plus the patch-aggregation head's MIM loss (BEiT v2 Sec. 2.3), both on the masked positions
        through the shared final norm and MIM head."""
        m, head = self.model, self.aggregation
        early, last = m.get_intermediate_layers(images, [head.block, -1], bool_masked_pos=mask)  # (B, 1+N, D) each
        shared = m.rel_pos_bias(m.rel_pos_index) if m.rel_pos_bias is not None else None
        agg = head(last[:, :1], early[:, 1:], shared, m.rel_pos_index)  # (B, N, D)
        target = targets()[mask]  # (M,)
        loss, acc = _masked_ce(m.lm_head(m.norm(last[:, 1:])[mask]), target)
        agg_loss, agg_acc = _masked_ce(m.lm_head(m.norm(agg)[mask]), target)
        total = loss + agg_loss
        return total, {"loss": total.detach(), "mlm_loss": loss.detach(), "mlm_acc": acc,
                       "agg_loss": agg_loss.detach(), "agg_acc": agg_acc}

    def _forward_teacher_target(self, images: torch.Tensor, mask: torch.Tensor, tok_images: torch.Tensor
                                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``1 - cos`` between the head's output and the teacher's patch features, over the masked positions."""
        teacher = self.__dict__["teacher"]
        if teacher is None or self.feature_head is None:
            raise ConfigError("beit.target=teacher: no teacher attached (set beit.teacher=PATH; the pretraining "
                              "task loads it)")
        target = teacher.features(tok_images, self.model.grid_size)  # (B, N, C) float32, no gradient
        tokens = self.model.forward_features(images, bool_masked_pos=mask)  # (B, 1+N, D)
        pred = self.feature_head(tokens[:, 1:][mask])  # (M, C)
        cos = F.cosine_similarity(pred.float(), target[mask], dim=-1)  # (M,)
        loss = _mean_or_zero((1 - cos).sum(), pred, cos.numel())
        feat_cos = cos.detach().mean() if cos.numel() else cos.new_zeros(())
        return loss, {"loss": loss.detach(), "feat_cos": feat_cos}

    def _pixel_targets(self, images: torch.Tensor) -> torch.Tensor:
        return pixel_targets(images, self.patch_size, self.cfg.norm_pix)  # (B, N, p*p*3)

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["images"]  # (B, 3, H, W)
        mask = batch["mask"].flatten(1).bool()  # (B, N), True = masked
        cfg = self.cfg

        if cfg.target == "tokens":
            targets = self._start_targets(batch["tok_images"])  # the student's forward may run meanwhile
            if self.aggregation is not None:
                return self._forward_aggregated(images, mask, targets)
            if cfg.predict == "masked":
                logits = self.model.forward_mim(images, mask)  # (M, V), row-major order of the mask
                ids = targets()  # (B, N)
                target = ids[mask]  # (M,)
                loss = _mean_or_zero(F.cross_entropy(logits.float(), target, reduction="sum"), logits, len(target))
                masked_logits = logits
            else:
                tokens = self.model.forward_features(images, bool_masked_pos=mask)  # (B, 1+N, D)
                logits = self.model.lm_head(tokens[:, 1:])  # (B, N, V)
                ids = targets()
                loss = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
                masked_logits, target = logits[mask], ids[mask]  # (M, V), (M,)
            with torch.no_grad():
                if len(target):
                    acc = (masked_logits.argmax(-1) == target).float().mean()
                else:
                    acc = torch.zeros((), device=images.device)
            return loss, {"loss": loss.detach(), "mlm_acc": acc}

        if cfg.target == "teacher":
            return self._forward_teacher_target(images, mask, batch["tok_images"])

        # target == "pixels"
        target_pix = self._pixel_targets(images)  # (B, N, p*p*3)
        tokens = self.model.forward_features(images, bool_masked_pos=mask)  # (B, 1+N, D)
        patches = tokens[:, 1:]  # (B, N, D)
        if cfg.predict == "masked":
            pred = self.pixel_head(patches[mask])  # (M, p*p*3)
            sq = (pred.float() - target_pix[mask]).pow(2).mean(-1)  # (M,)
            loss = _mean_or_zero(sq.sum(), pred, sq.numel())
        else:
            pred = self.pixel_head(patches)  # (B, N, p*p*3)
            loss = (pred.float() - target_pix).pow(2).mean()
        return loss, {"loss": loss.detach()}


def _masked_ce(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, accuracy) of ``(M, V)`` logits against ``(M,)`` ids; 0 (with a graph) when M = 0."""
    loss = _mean_or_zero(F.cross_entropy(logits.float(), target, reduction="sum"), logits, len(target))
    with torch.no_grad():
        acc = (logits.argmax(-1) == target).float().mean() if len(target) else logits.new_zeros(())
    return loss, acc


def _mean_or_zero(total: torch.Tensor, out: torch.Tensor, n: int) -> torch.Tensor:
    """``total / n``; a batch without a masked patch gives 0 (with a graph) instead of NaN."""
    if n == 0:
        return out.sum() * 0.0
    return total / n


def build(cfg, *, load_tokenizer):
    """Registry builder for ``--method beit``: (method, per-sample transform, resolved PretrainConfig);
    ``load_tokenizer``: path -> tokenizer (:func:`beit.loading.load_tokenizer`, handed in by the task)."""
    tok, tok_size = None, None
    device = cfg.train.device
    if cfg.beit.tokenizer_precision == "fp16" and (device == "cpu" or (device == "auto" and not torch.cuda.is_available())):
        raise ConfigError("beit.tokenizer_precision=fp16 needs CUDA; use fp32 or bf16 on CPU")  # before the run starts
    if cfg.beit.target == "tokens":
        if not cfg.tokenizer:
            raise ConfigError(
                "BEiT predicts visual tokens: pass --tokenizer TOK (train one with `beit tokenizer train "
                f"--data DIR --out TOK --preset {cfg.tokenizer_preset or 'dvae_32'}`), or set beit.target=pixels"
            )
        tok = load_tokenizer(cfg.tokenizer)
        tok_size = tok.cfg.img_size
        grid = tok.cfg.grid_size if hasattr(tok.cfg, "grid_size") else None
        if grid is not None and tuple(grid if isinstance(grid, tuple) else (grid, grid)) != cfg.model.grid_size:
            raise ConfigError(
                f"the tokenizer gives a {grid} grid of ids but the model has a {cfg.model.grid_size} grid of "
                f"patches ({cfg.model.img_size}px / patch {cfg.model.patch_size}); pick matching presets"
            )
    if cfg.beit.target == "teacher":
        if not cfg.beit.teacher:
            raise ConfigError("beit.target=teacher regresses a teacher's patch features: set beit.teacher=PATH "
                              "(a pretraining run or any backbone beit.load reads)")
        tok_size = cfg.model.img_size  # the teacher's view: the patch view's crop in [0, 1], resized by the teacher
    method = BEiTMethod.build(cfg.model, tok, cfg.beit)
    cfg = dataclasses.replace(cfg, model=method.model.cfg)
    transform = build_pretrain_transform(cfg.beit, cfg.model, tok_size)
    return method, transform, cfg


PRESETS: dict[str, dict] = recipes.PRETRAIN["beit"]  # the recipes live in beit.recipes (no torch)

register("beit", build, config=BEiTConfig, presets=PRESETS, default_preset=recipes.PRETRAIN_DEFAULTS["beit"],
         loads_tokenizer=True)
