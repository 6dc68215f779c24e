"""The demo's report page (``OUT/report.html``) and its terminal summary, built from what ran.

Every sentence that names a model, a method or a number is derived from the runs themselves: the
tokenizer's quantizer, vocabulary and patch size from its ``config.yaml``, the pretraining method and its
masking from the pretraining run's config, the curves from the keys its ``metrics.jsonl`` holds.
:mod:`.run` runs the stages; this module only reads their folders and results (:class:`.plan.FinishedDemo`).

Why one file of ~510 lines: it is the one page a demo writes (its verdict, tables, pictures and commands,
in the order the page shows them).
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw

from ..data.embedded import CLASS_TITLES
from ..data.folder import list_images
from ..tasks.segment_eval import palette
from ..viz.curves import plot_metrics, read_metrics
from ..viz.report import Figure, Section, Table, format_cell, write_report
from .plan import DEFAULT_METHOD, FinishedDemo, StageResult

log = logging.getLogger("beit")

__all__ = ["MEASURED_SPREAD", "finetune_recipe", "method_name", "pretraining_text", "probe_label", "summary_rows",
           "summary_text", "tokenizer_text", "verdict", "write_demo_report"]

# How much the demo's fine-tuning margins move between label draws (seeds 0, 1, 2 draw the 20 labelled images per
# class, the head and the data order; same backbone and validation images), measured for the default demo (MAE,
# 10 minutes): docs/notebook/2026-11-demo.md, "Two more label draws of the native run". One demo run is one draw.
MEASURED_SPREAD = {"method": "mae", "minutes": 10.0, "vs_scratch": (6.6, 11.0, 10.4), "vs_pixels": (8.2, 7.8, 4.2)}

# Curves worth a panel, in this order, when the run logged them.
TOKENIZER_CURVES = ("loss", "recon", "kl", "tau", "commitment", "perplexity", "psnr")

_QUANTIZERS = {
    "gumbel": "A discrete VAE (DALL-E style: a Gumbel-softmax relaxation of a categorical code)",
    "vq": "A VQ-VAE (each encoder vector snaps to its nearest codebook entry, an EMA of the vectors it gets)",
}
_METHODS = {
    "beit": "the transformer predicts the visual tokens of the masked patches from the rest (BEiT, arXiv 2106.08254)",
    "mae": "the encoder sees only the visible patches and a light decoder regresses the pixels of the masked "
           "ones (MAE, arXiv 2111.06377)",
    "ibot": "a student matches an EMA teacher's distributions for [CLS] and for the masked patches, an online "
            "tokenizer (iBOT, arXiv 2111.07832)",
}


_NAMES = {"beit": "BEiT", "mae": "MAE", "ibot": "iBOT"}


def method_name(method: str) -> str:
    """How the papers write a method's name (``ibot`` -> ``iBOT``)."""
    return _NAMES.get(method, method.upper())


def summary_text(rows: list[list], total: float) -> str:
    """The summary table for the terminal: ``[stage, metric, value, steps, seconds]`` rows, then the total."""
    head = ["step", "metric", "value", "steps", "seconds"]
    cells = [head] + [[format_cell(v)[0] for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(f"total: {total:.0f} s")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- summary


def summary_rows(summary: dict) -> list[list]:
    """``[stage, metric, value, steps, seconds]`` rows for the terminal and the report."""
    secs = {s["name"]: s for s in summary["stages"]}

    def row(stage: str, label: str, metric: str, value):
        s = secs.get(stage, {})
        sec = s.get("seconds")
        return [label, metric, value if not s.get("error") else "failed", s.get("steps") or None,
                round(sec) if sec is not None else None]

    t, p, f, pr, sg = (summary[k] for k in ("tokenizer", "pretrain", "finetune", "probe", "segment"))
    px = summary["pixels"]
    name = method_name(summary.get("method", DEFAULT_METHOD))
    tokenizer = [row("tokenizer", "tokenizer", "PSNR (dB), val", t["psnr"]),
                 row("tokenizer", "tokenizer", "codebook usage", t["codebook_usage"])] if "tokenizer" in secs else []
    pre = (row("pretrain", f"{name} pretraining", "masked-token accuracy (train)", p["mlm_acc"])
           if summary.get("method", DEFAULT_METHOD) == "beit"
           else row("pretrain", f"{name} pretraining", "loss (train)", p["loss"]))
    return [
        *tokenizer,
        pre,
        row("finetune_pretrained", f"fine-tune from {name}", "top-1 % (val)", f["pretrained"]["top1"]),
        row("finetune_scratch", "fine-tune from scratch", "top-1 % (val)", f["scratch"]["top1"]),
        row("baselines", "k-NN on raw pixels, same labels", "top-1 % (val)", px["knn_ft"]["top1"]),
        row("probe", probe_label("linear probe", pr["linear"]), "top-1 % (val)", pr["linear"]["top1"]),
        row("baselines", "linear on raw pixels, same labels", "top-1 % (val)", px["linear"]["top1"]),
        row("probe", probe_label("k-NN probe", pr["knn"]), "top-1 % (val)", pr["knn"]["top1"]),
        row("baselines", "k-NN on raw pixels, same labels", "top-1 % (val)", px["knn"]["top1"]),
        row("segment", "segmentation", "mIoU % (val)", sg["mIoU"]),
        row("segment", "segmentation", "pixel accuracy % (val)", sg["pixel_acc"]),
        *([row("segment", "segmentation from scratch", "mIoU % (val)", sb["scratch"]["mIoU"]),
           row("segment", "constant prediction (background)", "mIoU % (val)", sb["constant"]["mIoU"])]
          if (sb := summary.get("segment_baselines")) else []),
    ]


def probe_label(name: str, best: dict) -> str:
    """``"linear probe (grid pooling)"``: the pooling of the best probe, where the summary has it."""
    return f"{name} ({best['pool']} pooling)" if best.get("pool") else name


# --------------------------------------------------------------------------------------------- derived text


def _margin_vs_spread(margin: float, draws: tuple[float, ...]) -> str:
    lo, hi = min(draws), max(draws)
    width = hi - lo
    where = "larger than" if abs(margin) > width else "within"
    return f"{margin:+.1f} is {where} the {width:.1f}-point spread of three label draws ({lo:+.1f} to {hi:+.1f})"


def _points(margin: float) -> str:
    return f"{abs(margin):.1f} points {'above' if margin >= 0 else 'below'}"


def verdict(summary: dict) -> str:
    """The demo's result in one sentence: what beat what, by how much, and whether that exceeds the spread
    between label draws (measured for the default demo, :data:`MEASURED_SPREAD`; one run cannot measure it)."""
    f, px = summary["finetune"], summary["pixels"]
    pre, scr, pix = f["pretrained"].get("top1"), f["scratch"].get("top1"), px["knn_ft"].get("top1")
    name = method_name(summary.get("method", "mae"))
    if pre is None or scr is None or pix is None:
        return "No verdict: a fine-tuning or baseline step failed (see the sections below)."
    smoke = summary.get("minutes", 10.0) < 1.0
    lead = "Smoke test (tiny subsets, 2 steps a stage: the numbers say nothing about the method): " if smoke else ""
    text = (f"{lead}fine-tuned from {name} pretraining, the classifier reaches {pre:.1f}% top-1, "
            f"{_points(pre - scr)} the same recipe from scratch ({scr:.1f}%) and {_points(pre - pix)} k-NN on the "
            f"raw pixels with the same labels ({pix:.1f}%)")
    seg, base = summary.get("segment") or {}, summary.get("segment_baselines") or {}
    if seg.get("mIoU") is not None and (base.get("scratch") or {}).get("mIoU") is not None \
            and (base.get("constant") or {}).get("mIoU") is not None:
        text += (f"; segmentation {seg['mIoU']:.1f} mIoU against {base['scratch']['mIoU']:.1f} from scratch and "
                 f"{base['constant']['mIoU']:.1f} for the constant prediction")
    s = MEASURED_SPREAD
    if summary.get("method") == s["method"] and summary.get("minutes") == s["minutes"] and not smoke:
        text += (f"; this is one label draw (seed {summary.get('seed', 0)}): the margin over scratch "
                 f"{_margin_vs_spread(pre - scr, s['vs_scratch'])}, the margin over the pixels "
                 f"{_margin_vs_spread(pre - pix, s['vs_pixels'])} (docs/notebook/2026-11-demo.md).")
    else:
        text += (f"; one label draw (seed {summary.get('seed', 0)}), whose spread is not measured for this setting "
                 f"(for the default {method_name(s['method'])} demo at {s['minutes']:g} minutes three draws moved "
                 f"the margins by {max(s['vs_scratch']) - min(s['vs_scratch']):.1f} and "
                 f"{max(s['vs_pixels']) - min(s['vs_pixels']):.1f} points, docs/notebook/2026-11-demo.md).")
    return text[0].upper() + text[1:]


def _config(run: Path) -> dict:
    path = run / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _logged_keys(run: Path) -> set[str]:
    path = run / "metrics.jsonl"
    return {k for r in read_metrics(path) for k in r} if path.is_file() else set()


def tokenizer_text(cfg: dict) -> str:
    """What the tokenizer run trained, from its config (``model.quantizer``, vocabulary, token grid)."""
    m = cfg.get("model") or {}
    kind = _QUANTIZERS.get(m.get("quantizer", "gumbel"), f"A {m.get('quantizer')} tokenizer")
    size, groups = m.get("img_size"), m.get("n_groups")
    patch = f"{2 ** (groups - 1)}x{2 ** (groups - 1)} patch" if groups else "patch"
    words = f"one of {m['vocab_size']} visual words" if m.get("vocab_size") else "a visual word"
    return (f"{kind} learns to describe every {patch} of a {size} px image with {words}. The pretraining target "
            "is this code: the better the tokenizer reconstructs images through it, the more the words mean.")


def finetune_recipe(cfg: dict) -> str:
    """The fine-tuning run's recipe in a few words, from its config (what is on, what is off)."""
    o, a = cfg.get("optim") or {}, cfg.get("aug") or {}
    parts = [f"AdamW lr {o['lr']:g}" if "lr" in o else "AdamW"]
    if o.get("layer_decay", 1.0) < 1.0:
        parts.append(f"layer-wise lr decay {o['layer_decay']:g}")
    if a.get("randaug_ops"):
        parts.append(f"RandAugment {a['randaug_ops']}/{a.get('randaug_magnitude')}")
    mix = [n for n in ("mixup", "cutmix") if a.get(n)]
    parts.append(" and ".join(m.capitalize() for m in mix) if mix else "no Mixup/CutMix")
    if a.get("label_smoothing"):
        parts.append(f"label smoothing {a['label_smoothing']:g}")
    return ", ".join(parts)


def pretraining_text(cfg: dict) -> str:
    """What the pretraining run did, from its config (method, masking, patch grid)."""
    method = cfg.get("method", "beit")
    m = cfg.get("model") or {}
    n = (m["img_size"] // m["patch_size"]) ** 2 if isinstance(m.get("img_size"), int) and m.get("patch_size") else 0
    sec = cfg.get(method) or {}
    if method == "beit":
        count = sec.get("num_masked") or (round(sec.get("mask_ratio", 0.4) * n) if n else None)
        how = "in blocks" if sec.get("masking", "block") == "block" else "uniformly"
        masked = f"{count} of the {n} patches are masked {how}" if count else f"patches are masked {how}"
    elif "mask_ratio" in sec:
        masked = f"{sec['mask_ratio']:.0%} of the patches are masked"
    else:
        masked = "patches are masked"
    return f"{method_name(method)} pretraining: {masked}, and {_METHODS.get(method, 'the model predicts them')}. " \
           "No labels are used."


# --------------------------------------------------------------------------------------------- pictures


def _safe(fn, *args, **kwargs):
    """A picture must never lose the report: on failure, log and return None."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        log.warning("could not draw %s: %s", getattr(fn, "__name__", fn), e)
        return None


def _sample_grid(root: Path, out: Path, per_class: int = 6) -> Path | None:
    """One column per class folder: its first ``per_class`` images (white where a class has fewer)."""
    cols = []
    for c in sorted(p for p in root.iterdir() if p.is_dir()):
        ims = [np.asarray(Image.open(f).convert("RGB")) for f in list_images(c)[:per_class]]
        if not ims:
            continue
        s = ims[0].shape[0]
        ims += [np.full((s, s, 3), 255, np.uint8)] * (per_class - len(ims))
        cols.append(np.concatenate([np.pad(i, ((1, 1), (1, 1), (0, 0)), constant_values=255) for i in ims], 0))
    if not cols:
        return None
    Image.fromarray(np.concatenate(cols, 1)).save(out)
    return out


def _seg_examples(seg: Path, out: Path, n: int = 6) -> Path | None:
    """Images above their masks (VOC palette: 0 black, 255 white) for the first ``n`` training canvases."""
    files = list_images(seg / "images" / "train")[:n]
    if not files:
        return None
    pal = palette(256)
    tops = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    bottoms = [pal[np.asarray(Image.open(seg / "masks" / "train" / f.name))] for f in files]

    def pad(a):
        return np.pad(a, ((2, 2), (2, 2), (0, 0)), constant_values=255)

    grid = np.concatenate([np.concatenate([pad(a) for a in tops], 1), np.concatenate([pad(b) for b in bottoms], 1)], 0)
    Image.fromarray(grid).save(out)
    return out


def _compare_curves(runs: dict[str, Path], out: Path) -> Path | None:
    """Validation top-1 and training loss of the fine-tuning runs on shared axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(7.6, 3.0))
    drawn = False
    for label, run in runs.items():
        rows = read_metrics(run / "metrics.jsonl")
        tr = [(r["step"], r["loss"]) for r in rows if "loss" in r and "images_per_s" in r]
        va = [(r["step"], r["val_top1"]) for r in rows if "val_top1" in r]
        if tr:
            axes[0].plot(*zip(*tr), lw=1.3, label=label)
            drawn = True
        if va:
            axes[1].plot(*zip(*va), marker="o", lw=1.3, label=label)
    if not drawn:
        plt.close(fig)
        return None
    for ax, title in zip(axes, ("training loss", "val top-1 %")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------- sections


def _notes(s: StageResult) -> list[str]:
    n = list(s.notes)
    for o in s.outputs:
        if isinstance(o, dict) and o.get("status") == "time_limit":
            n.append(f"stopped by the demo's time limit at step {o.get('step')} of {s.steps} "
                     "(the machine ran slower than in the timing run)")
    if s.error:
        n.insert(0, f"this step failed: {s.error}")
    if s.steps:
        n.append(f"{s.steps} training steps, {s.seconds:.0f} s")
    elif s.seconds:
        n.append(f"{s.seconds:.0f} s")
    return n


def _figures(*candidates: Figure | None) -> list[Figure]:
    return [f for f in candidates if f is not None]


def _data_section(demo: FinishedDemo, summary: dict, figs: Path) -> Section:
    c, st, found = summary["data"], demo.result("data"), []
    if hasattr(demo, "embedded"):
        grid = _safe(_sample_grid, demo.embedded.val, figs / "samples.png")
        segs = _safe(_seg_examples, demo.embedded.seg, figs / "seg_examples.png")
        found = _figures(
            Figure(grid, "one column per class: " + ", ".join(CLASS_TITLES), pixelated=True, width=2 * 34 * 10)
            if grid else None,
            Figure(segs, "segmentation canvases (top) and their masks (bottom)", pixelated=True, width=2 * 68 * 6)
            if segs else None)
    return Section(
        "Data",
        text="Fashion-MNIST test images shipped with beit (10 classes of 28 px grayscale garments, padded to "
             "32 px, written as RGB PNG folders). The split is fixed by the package: pretraining never sees a "
             "label, fine-tuning uses a few labels per class, and validation images are never trained on. "
             "The segmentation set pastes 2 to 4 garments on a 64 px canvas; each mask pixel holds the "
             "garment's class + 1 (0 is background, 255 marks faint edges, which are ignored).",
        tables=[Table(["folder", "images"], [["unlabelled (pretraining)", c.get("unlabelled")],
                                             ["labelled/train", c.get("train")], ["labelled/val", c.get("val")],
                                             ["seg train", c.get("seg_train")], ["seg val", c.get("seg_val")]])],
        figures=found,
        commands=["# your own data needs no preparation: any folder tree of images works for pretraining;",
                  "# labelled data: MY_LABELLED/train/<class>/*.png and MY_LABELLED/val/<class>/*.png;",
                  "# segmentation: MY_SEGMENTATION/images/{train,val}/x.png + MY_SEGMENTATION/masks/{train,val}/x.png",
                  *st.commands],
        notes=_notes(st))


def _tokenizer_section(demo: FinishedDemo, summary: dict, figs: Path) -> Section:
    run, st, t = demo.p.runs / "tokenizer", demo.result("tokenizer"), summary["tokenizer"]
    keys = [k for k in TOKENIZER_CURVES if k in _logged_keys(run)]
    curve = _safe(plot_metrics, run / "metrics.jsonl", figs / "tokenizer_curves.png", keys=keys,
                  title="tokenizer training") if keys else None
    return Section(
        "Visual tokenizer", text=tokenizer_text(_config(run)),
        tables=[Table(["PSNR (dB)", "codebook usage", "perplexity"],
                      [[t["psnr"], t["codebook_usage"], t["perplexity"]]], caption="held-out images")],
        figures=_figures(Figure(curve, "training curves: " + ", ".join(keys)) if curve else None,
                         Figure(run / "eval_grid.png",
                                "held-out images (top) and their reconstructions through the code (bottom)",
                                pixelated=True, width=620)),
        commands=st.commands, notes=_notes(st))


def _pretrain_section(demo: FinishedDemo, summary: dict) -> Section:
    run, st, p = demo.p.runs / "pretrain", demo.result("pretrain"), summary["pretrain"]
    cfg = _config(run)
    method = cfg.get("method", "beit")
    cols = [k for k in ("loss", "mlm_acc") if p.get(k) is not None] or ["loss"]
    names = {"loss": "loss", "mlm_acc": "masked-token accuracy"}
    return Section(
        f"{method_name(method)} pretraining", text=pretraining_text(cfg),
        tables=[Table(["steps", *(names[k] for k in cols)], [[p["step"], *(p[k] for k in cols)]],
                      caption="last logged training values")],
        # MAE draws its masks inside the model (no masks.png): its masked views are in the pictures section
        figures=_figures(Figure(run / "loss.png", "pretraining curves"),
                         Figure(run / "masks.png", "the masks of the first training views", pixelated=True)
                         if method != "mae" else None),
        commands=st.commands, notes=_notes(st))


def _finetune_section(demo: FinishedDemo, summary: dict, figs: Path) -> Section:
    fb, fs, f = demo.result("finetune_pretrained"), demo.result("finetune_scratch"), summary["finetune"]
    px = summary["pixels"]
    runs = demo.p.runs
    method = method_name(_config(runs / "pretrain").get("method", "beit"))
    cmp_png = _safe(_compare_curves, {f"from {method}": runs / "finetune-pretrained",
                                      "from scratch": runs / "finetune-scratch"}, figs / "finetune_compare.png")
    lpc = demo.labels_per_class
    return Section(
        "Fine-tuning with few labels",
        text=f"The same recipe ({finetune_recipe(_config(runs / 'finetune-scratch'))}) and the same number of "
             f"steps, starting from the {method}-pretrained backbone or from random weights (`--init none`).",
        tables=[Table(["initialisation", "labels per class", "top-1 %", "top-5 %"],
                      [[f"{method} pretraining", lpc, f["pretrained"]["top1"], f["pretrained"]["top5"]],
                       ["random (scratch)", lpc, f["scratch"]["top1"], f["scratch"]["top5"]],
                       ["none: k-NN on the raw pixels", lpc, px["knn_ft"]["top1"], px["knn_ft"]["top5"]]],
                      caption="best validation accuracy of each run; the last row learns nothing (the floor)")],
        figures=[Figure(cmp_png, "both runs")] if cmp_png else [],
        commands=fb.commands + fs.commands,
        notes=[f"from {method}: {n}" for n in _notes(fb)] + [f"from scratch: {n}" for n in _notes(fs)])


def _probe_section(demo: FinishedDemo, summary: dict) -> Section:
    st, ps, px, bl = demo.result("probe"), summary["probe"], summary["pixels"], demo.result("baselines")
    return Section(
        "Probes of the frozen backbone",
        text="Without training the backbone: a linear classifier (BatchNorm + Linear) and a weighted k-NN "
             "vote on the features of every block, pooled three ways (the mean of the patch tokens, the [CLS] "
             "token, the patch tokens averaged over a 4x4 grid, which keeps the layout the raw pixels have); "
             "the block and pooling are chosen on a held-out fifth of the probes' training labels, never on the "
             "validation images whose accuracy is reported.",
        tables=[Table(["protocol", "features", "best block", "pooling", "top-1 %"],
                      [row for key, name in (("linear", "linear"), ("knn", "k-NN")) for row in (
                          [name, "pretrained backbone", ps[key]["layer"], ps[key].get("pool") or "mean",
                           ps[key]["top1"]],
                          [name, "raw pixels (no learning)", "-", "-", px[key]["top1"]])],
                      caption="same labelled images and validation images for both features")],
        commands=st.commands + bl.commands, notes=_notes(st) + _notes(bl))


def _segment_section(demo: FinishedDemo, summary: dict, figs: Path) -> Section:
    run, st, s = demo.p.runs / "segment", demo.result("segment"), summary["segment"]
    head = ((_config(run).get("head") or {}).get("kind") or "upernet")
    head = {"upernet": "An UperNet head", "pup": "A SETR-PUP head"}.get(head, f"A {head} head")
    keys = [k for k in ("loss", "pixel_acc") if k in _logged_keys(run)]
    curve = _safe(plot_metrics, run / "metrics.jsonl", figs / "segment_curves.png", keys=keys,
                  title="segmentation training") if keys else None
    return Section(
        "Semantic segmentation",
        text=f"{head} on blocks of the pretrained backbone labels every pixel with its garment class.",
        tables=[Table(["backbone", "mIoU %", "pixel accuracy %", "mean class accuracy %"],
                      [[f"{method_name(_config(demo.p.runs / 'pretrain').get('method', 'mae'))} pretraining",
                        s["mIoU"], s["pixel_acc"], s["mAcc"]],
                       *([[name, b[key]["mIoU"], b[key]["pixel_acc"], b[key]["mAcc"]] for key, name in (
                           ("scratch", "random (scratch), same schedule"),
                           ("constant", "none: every pixel the most frequent training class"))]
                         if (b := summary.get("segment_baselines")) else [])],
                      caption="validation canvases; the last row learns nothing (the floor)"),
                Table(["label", "class", "colour"], _legend_rows(), caption="the classes of the label maps")],
        figures=_figures(Figure(run / "predictions.png", "image | ground truth | prediction", pixelated=True,
                                width=384),
                         Figure(_safe(_legend_png, figs / "segment_legend.png"), "colours of the label maps"),
                         Figure(curve, "training curves") if curve else None),
        commands=st.commands, notes=_notes(st))


def _legend_rows() -> list[list]:
    """``[label, class, colour]`` of the demo's label maps: 0 background, 1..10 the Fashion-MNIST classes."""
    pal = palette(len(CLASS_TITLES) + 1)
    return [[i, name, "#" + "".join(f"{int(c):02x}" for c in pal[i])]
            for i, name in enumerate(("background", *CLASS_TITLES))]


def _legend_png(out: Path) -> Path:
    """Swatches in the palette of ``predictions.png``, each with its class name."""
    rows = _legend_rows()
    img = Image.new("RGB", (170, 16 * len(rows) + 4), "white")
    draw = ImageDraw.Draw(img)
    for k, (label, name, colour) in enumerate(rows):
        y = 2 + 16 * k
        draw.rectangle([4, y, 18, y + 12], fill=colour, outline="grey")
        draw.text((24, y), f"{label} {name}", fill="black")
    img.save(out)
    return out


def _pictures_section(demo: FinishedDemo) -> Section:
    st = demo.result("pictures")
    made: dict[str, Any] = getattr(demo, "pictures_made", {"attention": [], "masked": []})
    if demo.uses_tokenizer:
        what, caption = "decoded into pixels by the tokenizer", "image | masked | predicted tokens decoded | true tokens decoded"
    else:
        what, caption = "as pixels", "original | masked | reconstruction | reconstruction + visible patches"
    return Section(
        "Inside the pretrained model",
        text=f"Where the [CLS] token of the last block looks, per head; and what the model predicts for "
             f"masked patches, {what}.",
        figures=[Figure(x, "[CLS] attention") for x in made["attention"]]
        + [Figure(x, caption) for x in made["masked"]],
        commands=st.commands, notes=_notes(st))


def precision_note(precisions: dict[str, str]) -> str:
    kinds = sorted(set(precisions.values()))
    which = kinds[0] + " in every training run" if len(kinds) == 1 else ", ".join(
        f"{k}: {v}" for k, v in precisions.items())
    return (f"Precision: {which or 'none recorded'} (train.precision=auto: bf16 where this CPU measures a bf16 "
            "matmul clearly faster than fp32, fp32 otherwise; bf16 on CUDA).")


def write_demo_report(demo: FinishedDemo, summary: dict) -> Path:
    """``OUT/report.html``: one section per stage, the summary table, the machine."""
    figs = demo.p.out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    tokenizer = [_tokenizer_section(demo, summary, figs)] if demo.uses_tokenizer else []
    pretrain = _pretrain_section(demo, summary)
    sections = [_data_section(demo, summary, figs), *tokenizer, pretrain, _finetune_section(demo, summary, figs),
                _probe_section(demo, summary), _segment_section(demo, summary, figs), _pictures_section(demo)]
    plan = demo.plan
    budget = f"{plan.minutes:g} min budget" + (" (smoke test: tiny subsets, 2 steps per stage)" if plan.smoke else "")
    arch = _config(demo.p.runs / "pretrain").get("model") or {}
    arch = (f"ViT {arch['embed_dim']} wide x {arch['depth']} deep, patch {arch['patch_size']} on "
            f"{arch['img_size']} px images" if {"embed_dim", "depth", "patch_size", "img_size"} <= set(arch)
            else "ViT")
    method = pretrain.title.replace(" pretraining", "")
    return write_report(
        demo.p.out / "report.html", f"beit demo: {method} end to end on Fashion-MNIST", sections,
        subtitle=f"{verdict(summary)} "
                 f"{'Tokenizer, p' if demo.uses_tokenizer else 'P'}retraining, fine-tuning, probes and "
                 f"segmentation in one run: {budget}, "
                 f"{summary['total_seconds']:.0f} s in all, {arch}.",
        summary=Table(["step", "metric", "value", "steps", "seconds"], summary_rows(summary)),
        footer=[f"Machine: {summary['machine']}, {os.cpu_count()} CPU cores, Python {platform.python_version()}.",
                precision_note(summary["precision"]),
                "Images: Fashion-MNIST test set, Copyright 2017 Zalando SE, MIT licence "
                "(beit/data/embedded/COPYRIGHT)."])
