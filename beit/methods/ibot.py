"""iBOT: masked image modeling with an online tokenizer (Zhou et al., arXiv 2111.07832).

A student and a teacher share one architecture: our :class:`~beit.models.vit.VisionTransformer` plus a
projection head. The teacher is an exponential moving average of the student (no gradients), its momentum
rising from 0.996 to 1 on a cosine over training (``after_step``). For two global crops ``u, v`` of an image
(and optional local crops) the loss is (paper Eq. 1-2, ``iBOTLoss`` of the official code):

- [CLS] self-distillation across views: ``L_cls = mean_{q != s} -P_t^cls(q)^T log P_s^cls(s)`` over teacher
  global crops ``q`` and student crops ``s`` (global and local) from *different* views;
- masked-patch self-distillation within a view: the student sees global crop ``q`` with blockwise-masked
  patches replaced by [MASK]; ``L_mim = mean_q mean_b [sum_i m_bi (-P_t^patch(q)_bi^T log P_s^patch(q)_bi)
  / max(1, sum_i m_bi)]`` (masked patches only, averaged per image then over images; images with no mask
  count as 0, as in the official code);
- ``loss = lambda1 * L_cls + lambda2 * L_mim`` (1 and 1).

``P_s = softmax(h_s / 0.1)``; ``P_t = softmax((h_t - c) / tau_t)`` with centers ``c`` (1 x K for [CLS],
1 x 1 x K for patches) updated after each forward with momentum 0.9 from the mean raw teacher outputs
(all-reduced across processes) and teacher temperatures warmed up linearly 0.04 -> 0.07.

The head (DINO head, shared by [CLS] and patch tokens as in the released recipe): Linear-GELU-Linear-GELU-
Linear to a 256-d bottleneck, L2 normalisation, weight-normalised Linear to K=8192 without bias whose norm
``g`` is frozen at 1 (``norm_last_layer``). The student head runs on [CLS] and the *masked* patch tokens
only (the only ones the loss reads); the teacher head runs on every patch (the patch center needs them all).

Teacher, student, heads, centers and the schedule position (``step``) are all in this module's state dict,
so run checkpoints resume exactly. ``state_prefix`` is the teacher's backbone (the default for ``beit.load``
and downstream commands); ``backbones`` names both, for ``beit.load(run, which="student")``.

Not reproduced: the weight-decay schedule 0.04 -> 0.4 (the engine keeps weight decay constant) and the
``pred_start_epoch`` delay (0 for ViTs in the recipe).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import recipes
from ..config import ConfigError, ModelConfig, check_fields, replace
from ..data.multicrop import MultiCropTransform
from ..masking import block_mask
from ..models.vit import VisionTransformer
from ..optim import cosine
from .base import Method
from .registry import register

__all__ = ["IBOTConfig", "IBOTHead", "IBOTMethod", "IBOTTransform", "ibot_loss", "teacher_temperature"]


@dataclass
class IBOTConfig:
    """iBOT knobs (official ``main_ibot.py`` defaults and the released ViT commands)."""

    out_dim: int = 8192  # K, prototypes of the shared [CLS]/patch head
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    norm_last_layer: bool = True  # freeze the weight-norm gain g at 1 (recipe: true for ViT-B, false for ViT-S)
    momentum_teacher: float = 0.996  # EMA momentum at the start; cosine to 1 at the end
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07  # [CLS]
    warmup_teacher_patch_temp: float = 0.04
    teacher_patch_temp: float = 0.07
    teacher_temp_warmup: float = 30 / 800  # fraction of training over which temperatures rise linearly
    center_momentum: float = 0.9
    lambda1: float = 1.0  # [CLS] loss weight
    lambda2: float = 1.0  # masked-patch loss weight
    freeze_last_layer: float = 0.0  # fraction of training with the last head layer frozen (recipe: 1 epoch)
    # per-image masking ratio: one entry of pred_ratio chosen uniformly, then uniform in [r - var, r + var]
    # (recipe: (0, 0.3) and (0, 0.2): half the crops unmasked, the others 10%-50% masked)
    pred_ratio: tuple[float, ...] = (0.0, 0.3)
    pred_ratio_var: tuple[float, ...] = (0.0, 0.2)
    min_aspect: float = 0.3
    # multi-crop
    global_crops: int = 2
    local_crops: int = 0
    local_crop_size: int = 96
    global_crop_scale: tuple[float, float] = (0.14, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)

    def __post_init__(self) -> None:
        check_fields(self, "ibot", {
            "out_dim hidden_dim bottleneck_dim head_layers local_crop_size": "size", "local_crops": "count",
            "student_temp warmup_teacher_temp teacher_temp warmup_teacher_patch_temp teacher_patch_temp": "positive",
            "momentum_teacher center_momentum teacher_temp_warmup freeze_last_layer": "prob",
            "lambda1 lambda2": "nonneg", "global_crop_scale local_crop_scale min_aspect": "positive"})
        if len(self.pred_ratio) != len(self.pred_ratio_var) or not self.pred_ratio:
            raise ConfigError("ibot.pred_ratio and ibot.pred_ratio_var need the same (non-zero) length")
        for r, v in zip(self.pred_ratio, self.pred_ratio_var):
            if not (0.0 <= r - v and r + v <= 1.0 and v >= 0):
                raise ConfigError(f"ibot.pred_ratio {r} +- {v} must stay within [0, 1]")
        if self.global_crops < 2:
            raise ConfigError("ibot.global_crops must be >= 2 (the [CLS] loss compares different views)")
        if self.head_layers < 1 or self.bottleneck_dim < 1:
            raise ConfigError("ibot.head_layers and ibot.bottleneck_dim must be >= 1")


# --------------------------------------------------------------------------------------------- schedules


def teacher_temperature(step: int, total_steps: int, start: float, end: float, warmup_fraction: float) -> float:
    """Linear warm-up from ``start`` at step 0 to ``end`` at the last warm-up step, then ``end``
    (official: ``np.linspace(start, end, warmup_epochs)`` indexed by epoch; here per optimiser step).
    ``total_steps = 0`` means the schedule has not started (before the first ``after_step``): ``start``."""
    if total_steps <= 0:
        return start
    warm = int(round(warmup_fraction * total_steps))
    if warm <= 1 or step >= warm - 1:
        return end
    return start + (end - start) * step / (warm - 1)


# --------------------------------------------------------------------------------------------- head


class WeightNormLinear(nn.Module):
    """``y = g * (v / ||v||) x`` per output row, no bias (``nn.utils.weight_norm(Linear(..., bias=False))``)."""

    def __init__(self, in_dim: int, out_dim: int, freeze_g: bool):
        super().__init__()
        lin = nn.Linear(in_dim, out_dim, bias=False)  # PyTorch default init, as the official head
        self.weight_v = nn.Parameter(lin.weight.detach().clone())  # (K, d)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not freeze_g)  # (K, 1)
        self.frozen = False  # set by the method during ``freeze_last_layer``

    def weight(self) -> torch.Tensor:
        v = self.weight_v.detach() if self.frozen else self.weight_v
        g = self.weight_g.detach() if self.frozen else self.weight_g
        return g * v / v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype))


class IBOTHead(nn.Module):
    """DINO/iBOT projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes."""

    def __init__(self, in_dim: int, cfg: IBOTConfig):
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim] + [cfg.hidden_dim] * (cfg.head_layers - 1) + [cfg.bottleneck_dim]
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(cfg.bottleneck_dim, cfg.out_dim, cfg.norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., D) -> (..., K)``."""
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class _Net(nn.Module):
    def __init__(self, backbone: VisionTransformer, head: IBOTHead):
        super().__init__()
        self.backbone = backbone
        self.head = head


# --------------------------------------------------------------------------------------------- loss


def ibot_loss(
    student_cls: list[torch.Tensor],
    student_patch: torch.Tensor,
    masks: torch.Tensor,
    teacher_cls: torch.Tensor,
    teacher_patch: torch.Tensor,
    center_cls: torch.Tensor,
    center_patch: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    teacher_patch_temp: float,
    lambda1: float = 1.0,
    lambda2: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The iBOT objective (see the module docstring) from head outputs.

    - ``student_cls``: one ``(B, K)`` per crop, the ``G`` global crops first, then the local crops;
    - ``student_patch``: ``(M, K)`` student outputs at the masked patches, in the row-major order of ``masks``;
    - ``masks``: ``(G, B, N)`` bool, True = masked (global crops only);
    - ``teacher_cls`` ``(G, B, K)`` and ``teacher_patch`` ``(G, B, N, K)``: raw teacher outputs;
    - centers ``(1, K)`` and ``(1, 1, K)``.

    Returns ``{"loss", "cls", "patch", "kl", "teacher_entropy"}`` (the last two without gradients;
    ``loss = kl + teacher_entropy``).
    """
    G, B, N = masks.shape
    t_cls = F.softmax((teacher_cls.float() - center_cls) / teacher_temp, dim=-1)  # (G, B, K)
    t_patch = F.softmax((teacher_patch.float() - center_patch) / teacher_patch_temp, dim=-1)  # (G, B, N, K)

    cls_terms = []
    for q in range(G):
        for v, s in enumerate(student_cls):
            if v != q:
                ce = -(t_cls[q] * F.log_softmax(s.float() / student_temp, dim=-1)).sum(-1)  # (B,)
                cls_terms.append(ce.mean())
    loss_cls = torch.stack(cls_terms).mean()

    # masked patches of all global crops at once: (M, K) against the teacher at the same positions
    ce = -(t_patch[masks] * F.log_softmax(student_patch.float() / student_temp, dim=-1)).sum(-1)  # (M,)
    counts = masks.reshape(G * B, N).sum(1)  # (G*B,) masked patches per image
    image = torch.arange(G * B, device=masks.device).repeat_interleave(counts)  # (M,) image of each term
    per_image = torch.zeros(G * B, device=ce.device, dtype=ce.dtype).index_add(0, image, ce)  # (G*B,)
    per_image = per_image / counts.clamp(min=1).to(ce.dtype)
    loss_patch = per_image.view(G, B).mean(1).mean(0)  # images, then crops

    # teacher entropies, averaged exactly as the cross-entropies above: loss - entropy = KL(P_t || P_s) >= 0,
    # the part the student can reduce (the entropy itself rises as centering and the temperature warm-up
    # flatten the teacher, so the raw loss of a short run need not fall)
    with torch.no_grad():
        ent_cls = -(t_cls * t_cls.clamp_min(1e-30).log()).sum(-1).mean()  # each teacher view in G+L-1 pairs
        ent = -(t_patch[masks] * t_patch[masks].clamp_min(1e-30).log()).sum(-1)  # (M,)
        ent_img = torch.zeros(G * B, device=ent.device, dtype=ent.dtype).index_add(0, image, ent)
        ent_patch = (ent_img / counts.clamp(min=1).to(ent.dtype)).view(G, B).mean(1).mean(0)
        kl = (loss_cls - ent_cls) * lambda1 + (loss_patch - ent_patch) * lambda2

    loss_cls, loss_patch = loss_cls * lambda1, loss_patch * lambda2
    return {"loss": loss_cls + loss_patch, "cls": loss_cls, "patch": loss_patch, "kl": kl,
            "teacher_entropy": ent_cls * lambda1 + ent_patch * lambda2}


# --------------------------------------------------------------------------------------------- method


class IBOTMethod(Method):
    """``forward(batch) -> (loss, {"loss", "cls", "patch", "kl", "teacher_entropy", "teacher_temp"})``.

    ``batch``: ``global_crops`` (B, G, 3, H, W) normalised; ``masks`` (B, G, h, w) bool (True = masked);
    optional ``local_crops`` (B, L, 3, h', w').
    """

    # the teacher is the default weights of ``beit.load`` and downstream commands
    state_prefix = "teacher.backbone."
    backbones = {"teacher": "teacher.backbone.", "student": "student.backbone."}

    def __init__(self, backbone: VisionTransformer, cfg: IBOTConfig | None = None):
        super().__init__()
        self.cfg = cfg if cfg is not None else IBOTConfig()
        if backbone.mask_token is None:
            raise ConfigError("the iBOT student needs a [MASK] embedding: model.use_mask_token=true")
        self.student = _Net(backbone, IBOTHead(backbone.embed_dim, self.cfg))
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        K = self.cfg.out_dim
        self.register_buffer("center_cls", torch.zeros(1, K))
        self.register_buffer("center_patch", torch.zeros(1, 1, K))
        # schedule position, in the state dict so a resumed run continues the schedules exactly
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("total_steps", torch.zeros((), dtype=torch.long))
        # the last head layer gets no gradient while frozen: DDP must allow unused parameters then
        self.find_unused_parameters = self.cfg.freeze_last_layer > 0

    @classmethod
    def build(cls, model_cfg: ModelConfig, cfg: IBOTConfig | None = None) -> IBOTMethod:
        model_cfg = replace(model_cfg, vocab_size=0, num_classes=0, use_mask_token=True)
        return cls(VisionTransformer(model_cfg), cfg)

    def train(self, mode: bool = True) -> IBOTMethod:
        super().train(mode)
        self.teacher.eval()  # no dropout / stochastic depth in the teacher, ever
        return self

    # ------------------------------------------------------------------------------------------ schedules

    def temperatures(self) -> tuple[float, float]:
        step, total, c = int(self.step), int(self.total_steps), self.cfg
        return (teacher_temperature(step, total, c.warmup_teacher_temp, c.teacher_temp, c.teacher_temp_warmup),
                teacher_temperature(step, total, c.warmup_teacher_patch_temp, c.teacher_patch_temp,
                                    c.teacher_temp_warmup))

    def momentum(self, step: int, total_steps: int) -> float:
        """EMA momentum after optimiser step ``step`` (1-based): cosine 0.996 -> 1 over the 0-based steps."""
        return cosine(step - 1, total_steps, self.cfg.momentum_teacher, 1.0)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA update of the teacher: ``theta_t <- m * theta_t + (1 - m) * theta_s`` (every parameter)."""
        m = self.momentum(step, total_steps)
        for ps, pt in zip(self.student.parameters(), self.teacher.parameters()):
            pt.mul_(m).add_(ps.detach(), alpha=1.0 - m)
        self.step.fill_(step)
        self.total_steps.fill_(total_steps)

    @torch.no_grad()
    def update_centers(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor) -> None:
        """``c <- 0.9 c + 0.1 mean(raw teacher outputs)`` over all crops, images (and patches); the sums are
        all-reduced so every process keeps the same centers."""
        cls_sum = teacher_cls.float().flatten(0, -2).sum(0, keepdim=True)  # (1, K)
        patch_sum = teacher_patch.float().mean(-2).flatten(0, -2).sum(0, keepdim=True)  # (1, K)
        n = torch.tensor(float(teacher_cls.flatten(0, -2).shape[0]), device=cls_sum.device)
        if dist.is_available() and dist.is_initialized():
            packed = torch.cat((cls_sum, patch_sum, n.view(1, 1)), dim=1)
            dist.all_reduce(packed)
            K = cls_sum.shape[1]
            cls_sum, patch_sum, n = packed[:, :K], packed[:, K:2 * K], packed[0, 2 * K]
        mom = self.cfg.center_momentum
        self.center_cls.mul_(mom).add_(cls_sum / n, alpha=1 - mom)
        self.center_patch.mul_(mom).add_((patch_sum / n).unsqueeze(0), alpha=1 - mom)

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = batch["global_crops"]  # (B, G, 3, H, W)
        B, G = g.shape[:2]
        x = g.transpose(0, 1).flatten(0, 1)  # (G*B, 3, H, W), crop-major as the official MultiCropWrapper
        masks = batch["masks"].transpose(0, 1).reshape(G * B, -1).bool()  # (G*B, N)
        N = masks.shape[1]

        total = int(self.total_steps)  # 0 before the first after_step: the start of training
        frozen = self.training and self.cfg.freeze_last_layer > 0 and (
            total == 0 or int(self.step) < int(round(self.cfg.freeze_last_layer * total)))
        self.student.head.last_layer.frozen = frozen

        with torch.no_grad():
            t_tok = self.teacher.backbone.forward_features(x)  # (G*B, 1+N, D)
            t_out = self.teacher.head(t_tok)  # (G*B, 1+N, K)
            t_cls = t_out[:, 0].view(G, B, -1)  # (G, B, K)
            t_patch = t_out[:, 1:].view(G, B, N, -1)  # (G, B, N, K)

        s_tok = self.student.backbone.forward_features(x, bool_masked_pos=masks)  # (G*B, 1+N, D)
        s_cls = self.student.head(s_tok[:, 0]).view(G, B, -1)  # (G, B, K)
        s_patch = self.student.head(s_tok[:, 1:][masks])  # (M, K), only the masked patches
        student_cls = list(s_cls.unbind(0))
        local = batch.get("local_crops")
        if local is not None and local.shape[1] > 0:
            L = local.shape[1]
            feats = self.student.backbone.forward_features(local.transpose(0, 1).flatten(0, 1), any_size=True)[:, 0]  # (L*B, D)
            student_cls += list(self.student.head(feats).view(L, B, -1).unbind(0))

        temp, patch_temp = self.temperatures()
        out = ibot_loss(student_cls, s_patch, masks.view(G, B, N), t_cls, t_patch, self.center_cls,
                        self.center_patch, self.cfg.student_temp, temp, patch_temp, self.cfg.lambda1,
                        self.cfg.lambda2)
        if self.training:
            self.update_centers(t_cls, t_patch)
        metrics = {k: v.detach() for k, v in out.items()}
        metrics["teacher_temp"] = torch.tensor(temp)
        return out["loss"], metrics


# --------------------------------------------------------------------------------------------- data


def _pred_ratio(cfg: IBOTConfig, g: torch.Generator) -> float:
    u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
    k = min(int(u[0] * len(cfg.pred_ratio)), len(cfg.pred_ratio) - 1)
    r, v = cfg.pred_ratio[k], cfg.pred_ratio_var[k]
    return r - v + 2 * v * u[1] if v > 0 else r


class IBOTTransform:
    """``image -> {"global_crops": (G, 3, S, S), "masks": (G, h, w) bool, ["local_crops": (L, 3, s, s)]}``.

    Each global crop gets its own blockwise mask (BEiT's algorithm with the official iBOT minimum block of
    ``(min(h, w) // 3) ** 2`` patches and aspect ratios in [0.3, 1/0.3]) covering a per-crop ratio drawn
    from ``pred_ratio`` +- ``pred_ratio_var``.
    """

    def __init__(self, crops: MultiCropTransform, grid: tuple[int, int], cfg: IBOTConfig):
        self.crops = crops
        self.grid = grid
        self.cfg = cfg

    def mask(self, g: torch.Generator) -> torch.Tensor:
        h, w = self.grid
        n = int(round(_pred_ratio(self.cfg, g) * h * w))
        if n == 0:
            return torch.zeros(h, w, dtype=torch.bool)
        return block_mask(self.grid, n, min_block=max(1, (min(h, w) // 3) ** 2), min_aspect=self.cfg.min_aspect,
                          generator=g)

    def __call__(self, img: Any) -> dict[str, torch.Tensor]:
        globals_, locals_ = self.crops(img)  # torch global RNG, seeded per sample by the engine
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        out = {"global_crops": globals_, "masks": torch.stack([self.mask(g) for _ in range(len(globals_))])}
        if locals_ is not None:
            out["local_crops"] = locals_
        return out


def build_ibot_transform(cfg: IBOTConfig, model_cfg: ModelConfig) -> IBOTTransform:
    crops = MultiCropTransform(model_cfg.img_size, cfg.local_crop_size, cfg.global_crops, cfg.local_crops,
                               cfg.global_crop_scale, cfg.local_crop_scale)
    return IBOTTransform(crops, model_cfg.grid_size, cfg)


def build(cfg):
    """Registry builder for ``--method ibot``: (method, per-sample transform, resolved PretrainConfig)."""
    if cfg.ibot.local_crops and cfg.ibot.local_crop_size % cfg.model.patch_size:
        raise ConfigError(f"ibot.local_crop_size={cfg.ibot.local_crop_size} is not a multiple of "
                          f"model.patch_size={cfg.model.patch_size}")
    method = IBOTMethod.build(cfg.model, cfg.ibot)
    cfg = dataclasses.replace(cfg, model=method.student.backbone.cfg)
    return method, build_ibot_transform(cfg.ibot, cfg.model), cfg


PRESETS: dict[str, dict] = recipes.PRETRAIN["ibot"]  # the recipes live in beit.recipes (no torch)

register("ibot", build, config=IBOTConfig, presets=PRESETS, default_preset=recipes.PRETRAIN_DEFAULTS["ibot"])
