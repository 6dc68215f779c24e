"""The demo's plan: what it runs (presets, recipes, the shares of the time budget), how the budget sizes the
stages (:func:`make_plan`), the folders and their placeholders in the commands shown to the user
(:class:`Paths`), and the result of each stage (:class:`StageResult`). :mod:`.run` runs the stages;
:mod:`.report` reads them through :class:`FinishedDemo`.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .. import recipes

PRESET = "beit_tiny_patch4_32"  # the fine-tuning, probe and segmentation preset
# The pretraining methods the demo runs and the default (MAE): beit.recipes says why (kept there so that
# `beit demo --help` needs no torch)
METHODS = recipes.DEMO_METHODS
DEFAULT_METHOD = recipes.DEMO_DEFAULT_METHOD
TOKENIZER_PRESET = "vq_32_small"  # VQ learns fastest; half-width encoder, same BEiT result (docs/notebook/2026-11-cifar10-hour.md, 8.3)
DEMO_ARCH = ["model.embed_dim=96", "model.depth=4", "model.num_heads=3"]
# The small model's pretraining recipe where it differs from the method's preset. MAE: a one-block decoder
# (the preset has two). On the demo's images at 3,300 steps of 32 it gave fine-tuned 80.0 vs 78.4, frozen k-NN
# on the last two blocks' tokens 83.8 / 83.6 vs 82.8 / 83.0 and the linear probe 86.4 vs 85.0, one label draw,
# while each step took ~0.7x the time: the decoder (65 tokens x 128 wide) is most of the small model's
# arithmetic, the encoder sees only the 16 visible patches (docs/notebook/2026-12-03-demo-decoder.md).
DEMO_PRETRAIN = {"mae": ["mae.decoder_depth=1"]}
# Both fine-tunings (pretrained and scratch, the same recipe) classify from a 4x4 grid of the patch tokens: with
# 20 labels per class it gave +6.4 (from MAE) and +23.4 (from scratch) over the mean; and at twice the preset's
# lr (tuned on CIFAR-10's 1,000 labels): with 200 images it gave +2.0 from MAE and +4.6 from scratch, mean of
# three label draws (docs/notebook/2026-11-demo.md)
FINETUNE_RECIPE = ["model.head_grid=4", "optim.lr=2e-3"]
LABELS_PER_CLASS = 20  # fine-tuning "with a few labels"
# Shares of the time budget (re-balanced over the stages still to run, so an overrun is absorbed). The
# baselines and pictures take ~1-2 s whatever their share (a larger one left time unused at the end): the
# rest of what they had goes to pretraining.
SHARES = {"tokenizer": 0.18, "pretrain": 0.40, "finetune_pretrained": 0.10, "finetune_scratch": 0.10,
          "probe": 0.07, "baselines": 0.01, "segment": 0.13, "pictures": 0.01}
# On a slow machine the shares alone leave both learning stages short of what pays, so the planner reads
# each stage's measured step time and raises its budget to the steps that stage needs, up to a cap of the
# time then left (the stages after it share the rest). The numbers are measured for MAE on this data
# (docs/notebook/2026-12-03-demo-planner.md; one label draw, fine-tuned top-1 %, raw-pixel k-NN 72.6):
#   pretraining steps of 32:      1,312   3,631   4,558      from scratch
#   326 fine-tuning steps          74.6    76.6    78.4         64.8
#   700-750 fine-tuning steps      75.8    79.0      -          69.0-70.2
#   1,000-1,087 fine-tuning steps    -     80.2    83.0         74.0
# and with the one-block decoder (DEMO_PRETRAIN; docs/notebook/2026-12-03-demo-decoder.md, same draw):
#   pretraining steps of 32:      3,300   5,100
#   600 fine-tuning steps          80.0    78.0
#   1,000 fine-tuning steps        81.6    80.0
# Fine-tuning steps pay more per second than pretraining steps past ~3,000 of them (the frozen probes too
# barely moved from 3,300 to 5,100), so MAE's fine-tunings get 1,000 steps where the time allows, and the
# tokenizer's share goes mostly to them; the other methods keep their shares.
PRETRAIN_STEPS_WANTED = {"mae": 3300}
PRETRAIN_MAX_SHARE = 0.62
FINETUNE_STEPS_WANTED = {"mae": 1000}
FINETUNE_MAX_SHARE = 0.35  # of the time left, for each of the two fine-tunings (same steps)
# mean, [CLS], 4x4 grid and every patch token (the demo's model is small: 8x8 tokens x 96), the best reported;
# on the demo's images every token in place is what lifts the frozen k-NN over the raw pixels (docs/notebook/2026-11-demo.md)
PROBE_POOLS = "all,tokens"
NO_TOKENIZER_TO_FINETUNE = 0.08  # of the tokenizer's share, to each fine-tuning when there is no tokenizer
CALIBRATION_STEPS = 6  # the first steps of a run can be slow (allocator, kernel selection): the rate is read
CALIBRATION_WARMUP = 2  # from the steps after these
SMOKE_MINUTES = 1.0  # below this: tiny subsets, 2 steps per stage, no timing runs

# The user's folders in the reproduce commands
PLACEHOLDERS = {"unlabelled": "MY_IMAGES", "val_images": "MY_HELD_OUT_IMAGES", "labelled": "MY_LABELLED",
                "seg": "MY_SEGMENTATION", "image": "MY_PHOTO.png"}


@dataclass
class StageResult:
    name: str
    title: str
    seconds: float = 0.0
    steps: int = 0
    commands: list[str] = field(default_factory=list)  # with the user's placeholders
    outputs: list[Any] = field(default_factory=list)  # what each command printed (parsed JSON)
    error: str = ""
    notes: list[str] = field(default_factory=list)
    planned_step_s: float = 0.0  # seconds per step the timing run predicted (0: no timing run)


@dataclass
class Plan:
    minutes: float
    smoke: bool
    full_model: bool
    batch: int
    seg_batch: int
    data: dict


def make_plan(minutes: float, full_model: bool = False) -> Plan:
    smoke = minutes < SMOKE_MINUTES
    if smoke:
        data = dict(unlabelled_per_class=8, labels_per_class=4, val_per_class=2, seg_train=16, seg_val=4)
        return Plan(minutes, True, full_model, batch=16, seg_batch=8, data=data)
    big = minutes >= 30
    data = dict(unlabelled_per_class=None, labels_per_class=None, val_per_class=None if big else 50,
                seg_train=800 if big else 400, seg_val=200 if big else 50)
    return Plan(minutes, False, full_model, batch=64 if big else 32, seg_batch=16, data=data)


def with_hidden(argv: list[str], hidden: list[str]) -> list[str]:
    """``argv`` plus ``hidden``: its ``--flags`` go before the command's first flag (argparse takes trailing
    ``key=value`` overrides only after the last flag), its ``key=value`` overrides at the end."""
    flags = [h for h in hidden if "=" not in h or h.startswith("--")]
    overrides = [h for h in hidden if h not in flags]
    i = next((k for k, a in enumerate(argv) if a.startswith("--")), len(argv))
    return [*argv[:i], *flags, *argv[i:], *overrides]


class Paths:
    """The demo's folders, and their placeholders in the commands shown to the user."""

    def __init__(self, out: Path):
        self.out = out
        self.data = out / "data"
        self.runs = out / "runs"
        self.calib = out / ".calibration"

    def display(self, argv: list[str], mapping: dict[str, str]) -> str:
        """``beit ...`` with each demo path replaced by the user's placeholder (longest first), wrapped
        before flags with shell line continuations once a line passes 88 characters."""
        items = sorted(mapping.items(), key=lambda kv: -len(kv[0]))
        shown = []
        for a in argv:
            for real, placeholder in items:
                if a == real or a.startswith(real + os.sep):
                    a = placeholder + a[len(real):]
                    break
            shown.append(a)
        lines, cur = [], "beit"
        for i, tok in enumerate(shown):
            q = shlex.quote(tok)
            starts = tok.startswith("--") or ("=" in tok and not shown[i - 1].startswith("--"))
            if starts and len(cur) + 1 + len(q) > 88 and cur.strip() != "beit":
                lines.append(cur + " \\")
                cur = "    " + q
            else:
                cur += " " + q
        return "\n".join([*lines, cur])


class FinishedDemo(Protocol):
    """What the report reads of a demo that has run (:class:`beit.demo.run.Demo` is one): its folders, plan,
    data and the result of each stage; never how it ran them."""

    p: Paths
    plan: Plan
    embedded: Any  # the data folders (beit.data.embedded.EmbeddedData)
    uses_tokenizer: bool

    @property
    def labels_per_class(self) -> int: ...

    def result(self, name: str) -> StageResult: ...


__all__ = ["CALIBRATION_STEPS", "CALIBRATION_WARMUP", "DEFAULT_METHOD", "DEMO_ARCH", "DEMO_PRETRAIN", "FINETUNE_RECIPE",
           "FINETUNE_MAX_SHARE", "FINETUNE_STEPS_WANTED", "LABELS_PER_CLASS", "METHODS", "NO_TOKENIZER_TO_FINETUNE", "PLACEHOLDERS", "PRESET",
           "PRETRAIN_MAX_SHARE", "PRETRAIN_STEPS_WANTED", "PROBE_POOLS",
           "SHARES", "SMOKE_MINUTES", "TOKENIZER_PRESET", "FinishedDemo", "Paths", "Plan", "StageResult",
           "make_plan", "with_hidden"]
