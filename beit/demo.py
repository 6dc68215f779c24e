"""``beit demo``: the whole pipeline on real images shipped with the package, in a fixed time budget.

    beit demo --out runs/demo --minutes 10

1. writes the embedded Fashion-MNIST images as folders (:mod:`beit.data.embedded`);
2. trains a VQ tokenizer (``vq_32``) and evaluates it;
3. pretrains a ViT with BEiT on the unlabelled images;
4. fine-tunes with a few labels per class, from the pretrained backbone and from scratch (``--init none``);
5. probes the frozen backbone (linear, k-NN);
6. trains a segmenter on composed multi-garment images;
7. draws attention maps and masked-image-modeling predictions;

and writes ``OUT/report.html`` (one self-contained file) and ``OUT/summary.json``.

Every step *is* a ``beit`` command: the demo parses the command line shown in the report with the real
parser and calls the function the CLI calls, so the report's "reproduce" commands are exactly what ran,
with the demo's folders replaced by placeholders for the user's own.

Budgets: each training step gets a share of the time left; its number of steps is derived from a timing
run of 3 steps of the same command on a few images (so the cosine schedules run to their end, unlike a
wall-clock cut-off). Below one minute the demo is a smoke test: tiny subsets and 2 steps per stage.
To fit ten minutes on two CPU cores the backbone is narrowed to 96 wide x 4 deep (``--full-model`` keeps
the preset's 192 x 6) and the tokenizer to ``model.n_hid=32``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import platform
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import machine

log = logging.getLogger("beit")

PRESET = "beit_tiny_patch4_32"
TOKENIZER_PRESET = "vq_32"  # VQ learns fastest (docs/results.md)
DEMO_ARCH = ["model.embed_dim=96", "model.depth=4", "model.num_heads=3"]
DEMO_TOKENIZER = ["model.n_hid=32"]
LABELS_PER_CLASS = 20  # fine-tuning "with a few labels"
# Shares of the time budget (re-balanced over the stages still to run, so an overrun is absorbed).
SHARES = {"tokenizer": 0.18, "pretrain": 0.37, "finetune_beit": 0.10, "finetune_scratch": 0.10,
          "probe": 0.07, "segment": 0.13, "pictures": 0.05}
CALIBRATION_STEPS = 3
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


# --------------------------------------------------------------------------------------------- commands


def _parser() -> argparse.ArgumentParser:
    from .cli import build_parser

    return build_parser()


def run_command(argv: list[str]) -> Any:
    """Parse ``beit ARGV`` with the real parser and run it in this process; returns what it printed (JSON)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed why; a demo stage fails, the demo goes on
        raise RuntimeError(f"`beit {shlex.join(argv)}` is not a valid command line") from e
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = args.func(args)
    if rc:
        raise RuntimeError(f"`beit {shlex.join(argv)}` exited with status {rc}")
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    for ln in reversed(lines):
        try:
            return json.loads(ln)
        except ValueError:
            continue
    return None


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


def _rows(metrics: Path) -> list[dict]:
    from .viz.curves import read_metrics

    return read_metrics(metrics)


def _step_seconds(run_dir: Path, batch: int, wall: float) -> float:
    """Seconds per optimiser step from a timing run's metrics (the first row holds the start-up)."""
    rows = [r for r in _rows(run_dir / "metrics.jsonl") if "images_per_s" in r]
    later = [batch / r["images_per_s"] for r in rows[1:] if r["images_per_s"] > 0]
    if later:
        return sorted(later)[len(later) // 2]
    return wall / CALIBRATION_STEPS


# --------------------------------------------------------------------------------------------- the demo


class Demo:
    def __init__(self, out: str | Path, minutes: float = 10.0, full_model: bool = False, seed: int = 0):
        self.p = Paths(Path(out).expanduser().resolve())
        self.plan = make_plan(minutes, full_model)
        self.seed = seed
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + minutes * 60
        self.stages: list[StageResult] = []
        self.arch = [] if full_model else list(DEMO_ARCH)
        self.tok_arch = [] if full_model else list(DEMO_TOKENIZER)
        self.common = ["--workers", "0", "--seed", str(seed)]
        self._limit_s = 0.0

    # ---- budget

    def budget(self, stage: str) -> float:
        """Seconds for ``stage``: its share of the time left among the stages still to run."""
        names = list(SHARES)
        rest = names[names.index(stage):]
        left = max(self.deadline - time.perf_counter(), 0.0)
        return left * SHARES[stage] / sum(SHARES[n] for n in rest)

    def steps_for(self, stage: StageResult, budget: float, calib_argv_fn, batch: int,
                  eval_images: int = 0, n_evals: int = 0, min_steps: int = 5) -> int:
        """Steps that fit ``budget`` seconds, from a 3-step timing run of the same command (``calib_argv_fn``)
        on the few images of the calibration folders."""
        self._limit_s = budget
        if self.plan.smoke:
            return 2
        run_dir = self.p.calib / stage.name
        shutil.rmtree(run_dir, ignore_errors=True)
        t = time.perf_counter()
        run_command(calib_argv_fn(run_dir))
        wall = time.perf_counter() - t
        step_s = _step_seconds(run_dir, batch, wall)
        fixed = max(wall - CALIBRATION_STEPS * step_s, 0.0)  # start-up, small evaluation, pictures
        shutil.rmtree(run_dir, ignore_errors=True)
        how = "timing run"
        eval_s = n_evals * eval_images * step_s / batch / 3  # a forward pass is about a third of a step
        steps = int((budget - wall - fixed - eval_s) / step_s)
        self._limit_s = max(budget - wall, 0.0)
        stage.notes.append(f"{how}: {step_s:.2f} s per step of {batch} images, {fixed:.0f} s start-up; "
                           f"budget {budget:.0f} s")
        return max(min_steps, steps)

    def hidden(self, steps: int, time_limit: bool = True) -> list[str]:
        """Flags the demo adds to a training command and does not show: a log row every ~1/25 of the run
        (curves), and a wall-clock stop at 1.5x the stage's budget in case the machine slows down mid-run.
        Tasks get no stop: a task stopped before its evaluation would have no number to report (and
        fine-tuning augments on the CPU, so its timing run is what sizes it)."""
        h = [f"train.log_every={max(1, steps // 25)}"]
        if time_limit and not self.plan.smoke:
            h = ["--max-minutes", f"{max(1.5 * self._limit_s / 60, 0.2):.2f}", *h]
        return h

    def _stage(self, name: str, title: str) -> StageResult:
        st = StageResult(name, title)
        self.stages.append(st)
        log.info("[demo %.0fs] %s", time.perf_counter() - self.t0, title)
        return st

    def _run(self, st: StageResult, argv: list[str], mapping: dict[str, str], hidden: list[str] = ()) -> Any:
        """Run ``beit ARGV HIDDEN``; the report shows ``beit ARGV`` (``hidden``: the demo's own safety limits)."""
        st.commands.append(self.p.display(argv, mapping))
        out = run_command(with_hidden(argv, hidden))
        st.outputs.append(out)
        return out

    # ---- data

    def prepare_data(self) -> None:
        from .data.embedded import materialize

        st = self._stage("data", "Data: Fashion-MNIST folders")
        t = time.perf_counter()
        self.embedded = materialize(self.p.data, **self.plan.data, seed=self.seed)
        self.counts = self.embedded.counts()
        self._calibration_data()
        st.seconds = time.perf_counter() - t
        st.commands.append("python -c \"from beit.data.embedded import materialize; materialize('DEMO_DATA')\"")

    def _calibration_data(self) -> None:
        """A few files per folder for the timing runs (so a timing run never evaluates a full val set)."""
        if self.plan.smoke:
            return
        from .data.folder import list_images

        c, e = self.p.calib / "data", self.embedded
        shutil.rmtree(c, ignore_errors=True)
        b = max(self.plan.batch, self.plan.seg_batch)

        def copy(files, dest_root: Path, src_root: Path):
            for f in files:
                d = dest_root / f.relative_to(src_root)
                d.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, d)

        copy(list_images(e.unlabelled)[:: max(1, self.counts["unlabelled"] // b)][:b], c / "images", e.unlabelled)
        per = math.ceil(b / 10)
        for split, n in (("train", per), ("val", 1)):
            src = e.root / "labelled" / split
            for cls in sorted(p for p in src.iterdir() if p.is_dir()):
                copy(list_images(cls)[:n], c / "labelled" / split, src)
        for split, n in (("train", b), ("val", 2)):
            imgs = list_images(e.seg / "images" / split)[:n]
            copy(imgs, c / "seg" / "images" / split, e.seg / "images" / split)
            masks = [e.seg / "masks" / split / f.name for f in imgs]
            copy(masks, c / "seg" / "masks" / split, e.seg / "masks" / split)

    # ---- stages

    def tokenizer(self) -> None:
        st = self._stage("tokenizer", "Visual tokenizer (dVAE)")
        t = time.perf_counter()
        e, run = self.embedded, self.p.runs / "tokenizer"
        base = ["--preset", TOKENIZER_PRESET, "--batch-size", str(self.plan.batch), *self.common]

        def argv(out: Path, data: Path, steps: int, val: Path | None, extra=()) -> list[str]:
            v = ["--val-data", str(val)] if val is not None else []
            return ["tokenizer", "train", "--data", str(data), *v, "--out", str(out), "--steps", str(steps),
                    *base, *self.tok_arch, *extra]

        steps = self.steps_for(st, self.budget("tokenizer"),
                               lambda d: argv(d, self.p.calib / "data" / "images", CALIBRATION_STEPS, None,
                                              ["train.log_every=1"]), self.plan.batch)
        shutil.rmtree(run, ignore_errors=True)
        mapping = {str(e.unlabelled): PLACEHOLDERS["unlabelled"], str(e.val): PLACEHOLDERS["val_images"],
                   str(self.p.runs): "runs"}
        self._run(st, argv(run, e.unlabelled, steps, e.val), mapping, self.hidden(steps))
        self.tok_eval = self._run(st, ["tokenizer", "eval", "--tokenizer", str(run), "--data", str(e.val),
                                       "--grid", str(run / "eval_grid.png")], mapping)
        st.steps, st.seconds = steps, time.perf_counter() - t

    def pretrain(self) -> None:
        st = self._stage("pretrain", "BEiT pretraining")
        t = time.perf_counter()
        e, run = self.embedded, self.p.runs / "pretrain"
        tok = self.p.runs / "tokenizer"

        def argv(out: Path, data: Path, steps: int, extra=()) -> list[str]:
            return ["pretrain", "--data", str(data), "--tokenizer", str(tok), "--out", str(out), "--preset", PRESET,
                    "--steps", str(steps), "--batch-size", str(self.plan.batch), *self.common, *self.arch, *extra]

        steps = self.steps_for(st, self.budget("pretrain"),
                               lambda d: argv(d, self.p.calib / "data" / "images", CALIBRATION_STEPS,
                                              ["train.log_every=1"]), self.plan.batch)
        shutil.rmtree(run, ignore_errors=True)
        self.pre_out = self._run(st, argv(run, e.unlabelled, steps),
                                 {str(e.unlabelled): PLACEHOLDERS["unlabelled"], str(self.p.runs): "runs"},
                                 self.hidden(steps))
        st.steps, st.seconds = steps, time.perf_counter() - t

    def _finetune_argv(self, out: Path, data: Path, init: str, steps: int, lpc: int, extra=()) -> list[str]:
        arch = self.arch if init == "none" else []  # a checkpoint brings its own architecture
        return ["finetune", "--data", str(data), "--init", init, "--out", str(out), "--preset", PRESET,
                "--labels-per-class", str(lpc), "--steps", str(steps), "--batch-size", str(self.plan.batch),
                *self.common, f"train.eval_every={max(1, math.ceil(steps / 2))}", *arch, *extra]

    def finetune(self, which: str) -> None:
        scratch = which == "scratch"
        name = f"finetune_{which}"
        st = self._stage(name, "Fine-tuning from scratch" if scratch else "Fine-tuning the BEiT backbone")
        t = time.perf_counter()
        e = self.embedded
        init = "none" if scratch else str(self.p.runs / "pretrain")
        lpc = 4 if self.plan.smoke else LABELS_PER_CLASS
        run = self.p.runs / name.replace("_", "-")
        n_val = self.counts["val"]
        if scratch and getattr(self, "_ft_steps", None):
            steps = self._ft_steps  # the same schedule for both, so the comparison is fair
        else:
            steps = self.steps_for(st, self.budget(name),
                                   lambda d: self._finetune_argv(d, self.p.calib / "data" / "labelled", init,
                                                                 CALIBRATION_STEPS, lpc, ["train.log_every=1"]),
                                   self.plan.batch, eval_images=n_val, n_evals=2)
            self._ft_steps = steps
        shutil.rmtree(run, ignore_errors=True)
        self._run(st, self._finetune_argv(run, e.root / "labelled", init, steps, lpc),
                  {str(e.root / "labelled"): PLACEHOLDERS["labelled"], str(self.p.runs): "runs"},
                  self.hidden(steps, time_limit=False))
        st.steps, st.seconds = steps, time.perf_counter() - t
        st.notes.append(f"{lpc} labelled images per class ({10 * lpc} in all); validation: {n_val} images")

    def probe(self) -> None:
        st = self._stage("probe", "Frozen-backbone probes")
        t = time.perf_counter()
        e = self.embedded
        if self.plan.smoke:
            lpc = 4
        else:
            # feature extraction dominates: size the labelled set to the budget (forward ~ 3x a training step)
            ft = [s for s in self.stages if s.name == "finetune_beit"]
            rate = 3 * self.plan.batch * max(ft[0].steps, 1) / max(ft[0].seconds, 1e-3) if ft else 200.0
            per_run = self.budget("probe") / 2
            lpc = int(max(10, min(200, (per_run * rate - self.counts["val"]) / 10)))
        mapping = {str(e.root / "labelled"): PLACEHOLDERS["labelled"], str(self.p.runs): "runs"}
        init = str(self.p.runs / "pretrain")
        self.probes = {}
        for protocol in ("linear", "knn"):
            argv = ["probe", protocol, "--data", str(e.root / "labelled"), "--init", init,
                    "--labels-per-class", str(lpc), "--seed", str(self.seed),
                    "--out", str(self.p.runs / f"probe-{protocol}.json")]
            if protocol == "knn":
                argv += ["--k", str(min(20, 10 * lpc))]
            else:
                argv += ["--steps", "50" if self.plan.smoke else "300"]
            self.probes[protocol] = self._run(st, argv, mapping)
        st.seconds = time.perf_counter() - t
        st.notes.append(f"{lpc} labelled images per class for the probes; validation: {self.counts['val']} images")

    def segment(self) -> None:
        st = self._stage("segment", "Semantic segmentation")
        t = time.perf_counter()
        e, run = self.embedded, self.p.runs / "segment"
        init = str(self.p.runs / "pretrain")

        def argv(out: Path, data: Path, steps: int, extra=()) -> list[str]:
            return ["segment", "--data", str(data), "--init", init, "--out", str(out), "--preset", PRESET,
                    "--num-classes", "11", "--steps", str(steps), "--batch-size", str(self.plan.seg_batch),
                    *self.common, f"train.eval_every={max(1, math.ceil(steps / 2))}", *extra]

        steps = self.steps_for(st, self.budget("segment"),
                               lambda d: argv(d, self.p.calib / "data" / "seg", CALIBRATION_STEPS,
                                              ["train.log_every=1"]),
                               self.plan.seg_batch, eval_images=self.counts.get("seg_val", 0), n_evals=1)
        shutil.rmtree(run, ignore_errors=True)
        self._run(st, argv(run, e.seg, steps), {str(e.seg): PLACEHOLDERS["seg"], str(self.p.runs): "runs"},
                  self.hidden(steps, time_limit=False))
        st.steps, st.seconds = steps, time.perf_counter() - t

    def pictures(self) -> None:
        from .data.folder import list_images

        st = self._stage("pictures", "Inside the model")
        t = time.perf_counter()
        e = self.embedded
        pics = self.p.runs / "pictures"
        pics.mkdir(parents=True, exist_ok=True)
        pre, tok = str(self.p.runs / "pretrain"), str(self.p.runs / "tokenizer")
        classes = sorted(p for p in e.val.iterdir() if p.is_dir())
        images = [list_images(classes[i])[0] for i in (0, 7, 9) if i < len(classes)]
        self.pictures_made: dict[str, list[Path]] = {"attention": [], "mim": []}
        for k, img in enumerate(images):
            mapping = {str(img): PLACEHOLDERS["image"], str(self.p.runs): "runs"}
            out = pics / f"attention-{k}.png"
            self._run(st, ["show", "attention", "--init", pre, "--image", str(img), "--out", str(out)], mapping)
            self.pictures_made["attention"].append(out)
            out = pics / f"mim-{k}.png"
            self._run(st, ["show", "mim", "--init", pre, "--tokenizer", tok, "--image", str(img), "--out", str(out),
                           "--seed", str(k)], mapping)
            self.pictures_made["mim"].append(out)
        # one of each command is enough to show the user
        st.commands = st.commands[:2]
        st.seconds = time.perf_counter() - t

    # ---- driver

    def run(self) -> Path:
        steps = [("data", self.prepare_data), ("tokenizer", self.tokenizer), ("pretrain", self.pretrain),
                 ("finetune_beit", lambda: self.finetune("beit")), ("finetune_scratch", lambda: self.finetune("scratch")),
                 ("probe", self.probe), ("segment", self.segment), ("pictures", self.pictures)]
        needs = {"pretrain": {"tokenizer"}, "finetune_beit": {"pretrain"}, "probe": {"pretrain"},
                 "segment": {"pretrain"}, "pictures": {"pretrain", "tokenizer"}}
        failed: set[str] = set()
        for name, fn in steps:
            missing = needs.get(name, set()) & failed
            if missing or ("data" in failed and name != "data"):
                st = StageResult(name, name, error=f"skipped: {', '.join(sorted(missing or {'data'}))} failed")
                self.stages.append(st)
                failed.add(name)
                continue
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - one failed stage must not lose the others' results
                log.exception("demo stage %s failed", name)
                cur = self.stages[-1] if self.stages and self.stages[-1].name == name else self._stage(name, name)
                cur.error = f"{type(e).__name__}: {e}"
                failed.add(name)
        shutil.rmtree(self.p.calib, ignore_errors=True)
        self.total_seconds = time.perf_counter() - self.t0
        summary = self.summary()
        (self.p.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        path = write_demo_report(self, summary)
        return path

    # ---- results

    def stage(self, name: str) -> StageResult | None:
        return next((s for s in self.stages if s.name == name), None)

    def summary(self) -> dict:
        """Numbers of every stage (``None`` where a stage failed), timings and the plan, as JSON."""
        def out(name: str, i: int = 0) -> dict:
            st = self.stage(name)
            o = st.outputs[i] if st is not None and len(st.outputs) > i else None
            return o if isinstance(o, dict) else {}

        tok = out("tokenizer", 1)
        pre = out("pretrain")
        ft = {w: (out(f"finetune_{w}").get("best") or {}) for w in ("beit", "scratch")}
        probes = {p: (out("probe", i).get("best") or {}) for i, p in enumerate(("linear", "knn"))}
        seg = out("segment").get("best") or {}
        return {
            "tokenizer": {k: tok.get(k) for k in ("psnr", "codebook_usage", "perplexity")},
            "pretrain": {k: pre.get(k) for k in ("loss", "mlm_acc", "step")},
            "finetune": {w: {"top1": ft[w].get("top1"), "top5": ft[w].get("top5")} for w in ft},
            "probe": {p: {"top1": probes[p].get("top1"), "layer": probes[p].get("layer")} for p in probes},
            "segment": {k: seg.get(k) for k in ("mIoU", "pixel_acc", "mAcc")},
            "stages": [{"name": s.name, "seconds": round(s.seconds, 1), "steps": s.steps, "error": s.error}
                       for s in self.stages],
            "total_seconds": round(self.total_seconds, 1),
            "minutes": self.plan.minutes,
            "data": getattr(self, "counts", {}),
            "full_model": self.plan.full_model,
            "precision": run_precisions(self.p.runs),
            "machine": machine.describe(),
        }

    @staticmethod
    def summary_rows(summary: dict) -> list[list]:
        """``[stage, metric, value, steps, seconds]`` rows for the terminal and the report."""
        secs = {s["name"]: s for s in summary["stages"]}

        def row(stage: str, label: str, metric: str, value):
            s = secs.get(stage, {})
            sec = s.get("seconds")
            return [label, metric, value if not s.get("error") else "failed", s.get("steps") or None,
                    round(sec) if sec is not None else None]

        t, p, f, pr, sg = (summary[k] for k in ("tokenizer", "pretrain", "finetune", "probe", "segment"))
        return [
            row("tokenizer", "tokenizer", "PSNR (dB), val", t["psnr"]),
            row("tokenizer", "tokenizer", "codebook usage", t["codebook_usage"]),
            row("pretrain", "BEiT pretraining", "masked-token accuracy (train)", p["mlm_acc"]),
            row("finetune_beit", "fine-tune from BEiT", "top-1 % (val)", f["beit"]["top1"]),
            row("finetune_scratch", "fine-tune from scratch", "top-1 % (val)", f["scratch"]["top1"]),
            row("probe", "linear probe", "top-1 % (val)", pr["linear"]["top1"]),
            row("probe", "k-NN probe", "top-1 % (val)", pr["knn"]["top1"]),
            row("segment", "segmentation", "mIoU % (val)", sg["mIoU"]),
            row("segment", "segmentation", "pixel accuracy % (val)", sg["pixel_acc"]),
        ]


# --------------------------------------------------------------------------------------------- report


def summary_text(rows: list[list], total: float) -> str:
    from .viz.report import format_cell

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


def _sample_grid(root: Path, out: Path, per_class: int = 6) -> Path | None:
    """One column per class folder: its first ``per_class`` images (white where a class has fewer)."""
    import numpy as np
    from PIL import Image

    from .data.folder import list_images

    classes = sorted(p for p in root.iterdir() if p.is_dir())
    cols = []
    for c in classes:
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
    import numpy as np
    from PIL import Image

    from .data.folder import list_images
    from .tasks.segment import palette

    files = list_images(seg / "images" / "train")[:n]
    if not files:
        return None
    pal = palette(256)
    tops = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    bottoms = [pal[np.asarray(Image.open(seg / "masks" / "train" / f.name))] for f in files]
    pad = lambda a: np.pad(a, ((2, 2), (2, 2), (0, 0)), constant_values=255)  # noqa: E731
    grid = np.concatenate([np.concatenate([pad(a) for a in tops], 1), np.concatenate([pad(b) for b in bottoms], 1)], 0)
    Image.fromarray(grid).save(out)
    return out


def _compare_curves(runs: dict[str, Path], out: Path) -> Path | None:
    """Validation top-1 and training loss of the fine-tuning runs on shared axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .viz.curves import read_metrics

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


def write_demo_report(demo: Demo, summary: dict) -> Path:
    from .data.embedded import CLASS_TITLES
    from .viz.curves import plot_metrics
    from .viz.report import Figure, Section, Table, write_report

    runs, figs_dir = demo.p.runs, demo.p.out / "figures"
    figs_dir.mkdir(parents=True, exist_ok=True)

    def st(name: str) -> StageResult:
        return demo.stage(name) or StageResult(name, name, error="not run")

    def notes(s: StageResult) -> list[str]:
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

    sections = []
    c = summary["data"]
    data = st("data")
    data_figs = []
    if hasattr(demo, "embedded"):
        grid = _safe(_sample_grid, demo.embedded.val, figs_dir / "samples.png")
        if grid:
            data_figs.append(Figure(grid, "one column per class: " + ", ".join(CLASS_TITLES), pixelated=True,
                                    width=2 * 34 * 10))
        segs = _safe(_seg_examples, demo.embedded.seg, figs_dir / "seg_examples.png")
        if segs:
            data_figs.append(Figure(segs, "segmentation canvases (top) and their masks (bottom)", pixelated=True,
                                    width=2 * 68 * 6))
    sections.append(Section(
        "Data",
        text="Fashion-MNIST test images shipped with beit (10 classes of 28 px grayscale garments, padded to "
             "32 px, written as RGB PNG folders). The split is fixed by the package: pretraining never sees a "
             "label, fine-tuning uses a few labels per class, and validation images are never trained on. "
             "The segmentation set pastes 2 to 4 garments on a 64 px canvas; each mask pixel holds the "
             "garment's class + 1 (0 is background, 255 marks faint edges, which are ignored).",
        tables=[Table(["folder", "images"], [["unlabelled (pretraining)", c.get("unlabelled")],
                                             ["labelled/train", c.get("train")], ["labelled/val", c.get("val")],
                                             ["seg train", c.get("seg_train")], ["seg val", c.get("seg_val")]])],
        figures=data_figs,
        commands=["# your own data needs no preparation: any folder tree of images works for pretraining;",
                  "# labelled data: MY_LABELLED/train/<class>/*.png and MY_LABELLED/val/<class>/*.png;",
                  "# segmentation: MY_SEGMENTATION/images/{train,val}/x.png + MY_SEGMENTATION/masks/{train,val}/x.png",
                  *data.commands],
        notes=notes(data)))

    tok = st("tokenizer")
    t = summary["tokenizer"]
    tok_curve = _safe(plot_metrics, runs / "tokenizer" / "metrics.jsonl", figs_dir / "tokenizer_curves.png",
                      keys=("loss", "recon", "kl", "tau"), title="tokenizer training")
    sections.append(Section(
        "Visual tokenizer",
        text="A discrete VAE (DALL-E style, Gumbel-softmax relaxation) learns to describe every 4x4 patch "
             "with one of 512 visual words. BEiT's pretraining target is this code: the better the tokenizer "
             "reconstructs images through it, the more the words mean.",
        tables=[Table(["PSNR (dB)", "codebook usage", "perplexity"],
                      [[t["psnr"], t["codebook_usage"], t["perplexity"]]], caption="held-out images")],
        figures=[f for f in (Figure(tok_curve, "training curves") if tok_curve else None,
                             Figure(runs / "tokenizer" / "eval_grid.png",
                                    "held-out images (top) and their reconstructions through the code (bottom)",
                                    pixelated=True, width=620)) if f is not None],
        commands=tok.commands, notes=notes(tok)))

    pre = st("pretrain")
    p = summary["pretrain"]
    sections.append(Section(
        "BEiT pretraining",
        text="Masked image modeling: about 40% of the patches are masked in blocks and the transformer "
             "predicts their visual tokens from the rest (BEiT, arXiv 2106.08254). No labels are used.",
        tables=[Table(["steps", "loss", "masked-token accuracy"], [[p["step"], p["loss"], p["mlm_acc"]]],
                      caption="last logged training values")],
        figures=[Figure(runs / "pretrain" / "loss.png", "pretraining curves"),
                 Figure(runs / "pretrain" / "masks.png", "blockwise masks", pixelated=True)],
        commands=pre.commands, notes=notes(pre)))

    fb, fs = st("finetune_beit"), st("finetune_scratch")
    f = summary["finetune"]
    cmp_png = _safe(_compare_curves, {"from BEiT": runs / "finetune-beit", "from scratch": runs / "finetune-scratch"},
                    figs_dir / "finetune_compare.png")
    sections.append(Section(
        "Fine-tuning with few labels",
        text="The same recipe (layer-wise lr decay, Mixup/CutMix, RandAugment) and the same number of steps, "
             "starting from the pretrained backbone or from random weights (`--init none`).",
        tables=[Table(["initialisation", "labels per class", "top-1 %", "top-5 %"],
                      [["BEiT pretraining", LABELS_PER_CLASS if not demo.plan.smoke else 4, f["beit"]["top1"],
                        f["beit"]["top5"]],
                       ["random (scratch)", LABELS_PER_CLASS if not demo.plan.smoke else 4, f["scratch"]["top1"],
                        f["scratch"]["top5"]]], caption="best validation accuracy of each run")],
        figures=[Figure(cmp_png, "both runs")] if cmp_png else [],
        commands=fb.commands + fs.commands,
        notes=[f"from BEiT: {n}" for n in notes(fb)] + [f"from scratch: {n}" for n in notes(fs)]))

    pr = st("probe")
    ps = summary["probe"]
    sections.append(Section(
        "Probes of the frozen backbone",
        text="Without training the backbone: a linear classifier (BatchNorm + Linear) and a weighted k-NN "
             "vote on the features of every block; the best block is reported.",
        tables=[Table(["protocol", "best block", "top-1 %"],
                      [["linear", ps["linear"]["layer"], ps["linear"]["top1"]],
                       ["k-NN", ps["knn"]["layer"], ps["knn"]["top1"]]])],
        commands=pr.commands, notes=notes(pr)))

    sg = st("segment")
    s = summary["segment"]
    seg_curve = _safe(plot_metrics, runs / "segment" / "metrics.jsonl", figs_dir / "segment_curves.png",
                      keys=("loss", "pixel_acc"), title="segmentation training")
    sections.append(Section(
        "Semantic segmentation",
        text="An UperNet head on four blocks of the pretrained backbone labels every pixel with its garment class.",
        tables=[Table(["mIoU %", "pixel accuracy %", "mean class accuracy %"],
                      [[s["mIoU"], s["pixel_acc"], s["mAcc"]]], caption="validation canvases")],
        figures=[f for f in (Figure(runs / "segment" / "predictions.png", "image | ground truth | prediction",
                                    pixelated=True, width=384),
                             Figure(seg_curve, "training curves") if seg_curve else None) if f is not None],
        commands=sg.commands, notes=notes(sg)))

    pc = st("pictures")
    made = getattr(demo, "pictures_made", {"attention": [], "mim": []})
    sections.append(Section(
        "Inside the pretrained model",
        text="Where the [CLS] token of the last block looks, per head; and what the model predicts for "
             "masked patches, decoded into pixels by the tokenizer.",
        figures=[Figure(x, "[CLS] attention") for x in made["attention"]]
        + [Figure(x, "image | masked | predicted tokens decoded | true tokens decoded") for x in made["mim"]],
        commands=pc.commands, notes=notes(pc)))

    rows = demo.summary_rows(summary)
    budget = f"{demo.plan.minutes:g} min budget" + (" (smoke test: tiny subsets, 2 steps per stage)"
                                                    if demo.plan.smoke else "")
    arch = "ViT 192 wide x 6 deep" if demo.plan.full_model else "ViT 96 wide x 4 deep (--full-model: 192 x 6)"
    return write_report(
        demo.p.out / "report.html", "beit demo: BEiT end to end on Fashion-MNIST",
        sections,
        subtitle=f"Tokenizer, pretraining, fine-tuning, probes and segmentation in one run: {budget}, "
                 f"{summary['total_seconds']:.0f} s in all, {arch}, patch 4 on 32 px images.",
        summary=Table(["step", "metric", "value", "steps", "seconds"], rows),
        footer=[f"Machine: {summary['machine']}, {os.cpu_count()} CPU cores, Python {platform.python_version()}.",
                _precision_note(summary["precision"]),
                "Images: Fashion-MNIST test set, Copyright 2017 Zalando SE, MIT licence "
                "(beit/data/embedded/COPYRIGHT)."])


def run_precisions(runs: Path) -> dict[str, str]:
    """``{run: precision}`` as each training run resolved it (``train.precision`` in its config.yaml)."""
    import yaml

    out = {}
    for cfg in sorted(runs.glob("*/config.yaml")):
        train = (yaml.safe_load(cfg.read_text()) or {}).get("train") or {}
        if "precision" in train:
            out[cfg.parent.name] = train["precision"]
    return out


def _precision_note(precisions: dict[str, str]) -> str:
    kinds = sorted(set(precisions.values()))
    which = kinds[0] + " in every training run" if len(kinds) == 1 else ", ".join(
        f"{k}: {v}" for k, v in precisions.items())
    return (f"Precision: {which or 'none recorded'} (train.precision=auto: bf16 where this CPU measures a bf16 "
            "matmul clearly faster than fp32, fp32 otherwise; bf16 on CUDA).")


def _safe(fn, *args, **kwargs):
    """A picture must never lose the report: on failure, log and return None."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        log.warning("could not draw %s: %s", getattr(fn, "__name__", fn), e)
        return None


# --------------------------------------------------------------------------------------------- entry point


def run_demo(out: str | Path = "runs/demo", minutes: float = 10.0, *, full_model: bool = False, seed: int = 0
             ) -> tuple[Path, dict]:
    """Run the demo; returns ``(report path, summary)`` (see the module docstring)."""
    if minutes <= 0:
        from .config import ConfigError

        raise ConfigError(f"--minutes must be > 0, got {minutes}")
    demo = Demo(out, minutes, full_model=full_model, seed=seed)
    report = demo.run()
    return report, json.loads((demo.p.out / "summary.json").read_text())


__all__ = ["Demo", "Plan", "make_plan", "run_command", "run_demo", "summary_text"]
