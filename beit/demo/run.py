"""``beit demo``: the whole pipeline on real images shipped with the package, in a fixed time budget.

    beit demo --out runs/demo --minutes 10

1. writes the embedded Fashion-MNIST images as folders (:mod:`beit.data.embedded`);
2. with ``--method beit``: trains a VQ tokenizer (``vq_32_small``) and evaluates it (MAE, the default, needs none);
3. pretrains a ViT with MAE (default) or BEiT on the unlabelled images;
4. fine-tunes with a few labels per class, from the pretrained backbone and from scratch (``--init none``);
5. probes the frozen backbone (linear, k-NN);
6. trains a segmenter on composed multi-garment images;
7. draws attention maps and masked-image-modeling predictions;

and writes ``OUT/report.html`` (one self-contained file) and ``OUT/summary.json``.

Every step *is* a ``beit`` command: the demo hands the command line shown in the report to the CLI's runner
(``run_command``, given by ``beit demo``: the real parser, the function the CLI calls), so the report's
"reproduce" commands are exactly what ran, with the demo's folders replaced by placeholders for the user's own.

Budgets: each training step gets a share of the time left; its number of steps is derived from a timing
run of 3 steps of the same command on a few images (so the cosine schedules run to their end, unlike a
wall-clock cut-off). Below one minute the demo is a smoke test: tiny subsets and 2 steps per stage.
To fit ten minutes on two CPU cores the backbone is narrowed to 96 wide x 4 deep (``--full-model`` keeps
the preset's 192 x 6); the tokenizer is ``vq_32_small`` (n_hid 32), the tiny BEiT preset's own. Both
fine-tunings classify from a 4x4 grid of the patch tokens (``model.head_grid=4``), not their mean, at lr 2e-3.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .. import machine
from ..config import ConfigError
from ..data.embedded import materialize
from ..data.folder import list_images
from ..methods import registry as method_registry
from ..tasks.segment_eval import constant_baseline
from .clock import Clock
from .plan import (
    CALIBRATION_STEPS,
    DEFAULT_METHOD,
    DEMO_ARCH,
    DEMO_PRETRAIN,
    FINETUNE_MAX_SHARE,
    FINETUNE_RECIPE,
    FINETUNE_STEPS_WANTED,
    LABELS_PER_CLASS,
    METHODS,
    PLACEHOLDERS,
    PRESET,
    PRETRAIN_MAX_SHARE,
    PRETRAIN_STEPS_WANTED,
    PROBE_POOLS,
    TOKENIZER_PRESET,
    Paths,
    StageResult,
    make_plan,
    with_hidden,
)
from .report import method_name, write_demo_report

log = logging.getLogger("beit")

# ``beit ARGV`` run in this process -> what it printed (JSON): the CLI's runner, handed to the demo by
# ``beit demo`` (:func:`beit.cli.run_command`), so that the demo, an application above the library, never
# imports the command line it is a command of
Runner = Callable[[list[str]], Any]



# --------------------------------------------------------------------------------------------- the demo


def _no_runner(argv: list[str]) -> Any:
    raise RuntimeError(f"the demo runs `beit {' '.join(argv)}` through a command runner: give Demo(run_command=...) "
                       "(beit.cli.run_command)")


class Demo:
    def __init__(self, out: str | Path, minutes: float = 10.0, full_model: bool = False, seed: int = 0,
                 method: str = DEFAULT_METHOD, run_command: Runner | None = None):
        self.run_command: Runner = run_command or _no_runner
        if method not in METHODS:
            raise ConfigError(f"beit demo runs {' or '.join(METHODS)}, not {method!r}")
        self.method = method
        self.uses_tokenizer = method == "beit"
        self.p = Paths(Path(out).expanduser().resolve())
        self.plan = make_plan(minutes, full_model)
        self.seed = seed
        self.t0 = time.perf_counter()
        self.clock = Clock(self.t0 + minutes * 60, method, self.plan, self.p.calib, self.run_command)
        self.stages: list[StageResult] = []
        self.arch = [] if full_model else list(DEMO_ARCH)
        self.pre_recipe = [] if full_model else list(DEMO_PRETRAIN.get(method, ()))
        self.common = ["--workers", "0", "--seed", str(seed)]

    def _stage(self, name: str, title: str) -> StageResult:
        st = StageResult(name, title)
        self.stages.append(st)
        log.info("[demo %.0fs] %s", time.perf_counter() - self.t0, title)
        return st

    def _run(self, st: StageResult, argv: list[str], mapping: dict[str, str], hidden: list[str] = ()) -> Any:
        """Run ``beit ARGV HIDDEN``; the report shows ``beit ARGV`` (``hidden``: the demo's own safety limits)."""
        st.commands.append(self.p.display(argv, mapping))
        out = self.run_command(with_hidden(argv, hidden))
        st.outputs.append(out)
        return out

    # ---- data

    def prepare_data(self) -> None:
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
        st = self._stage("tokenizer", "Visual tokenizer")
        t = time.perf_counter()
        e, run = self.embedded, self.p.runs / "tokenizer"
        base = ["--preset", TOKENIZER_PRESET, "--batch-size", str(self.plan.batch), *self.common]

        def argv(out: Path, data: Path, steps: int, val: Path | None, extra=()) -> list[str]:
            v = ["--val-data", str(val)] if val is not None else []
            return ["tokenizer", "train", "--data", str(data), *v, "--out", str(out), "--steps", str(steps),
                    *base, *extra]

        steps = self.clock.steps_for(st, self.clock.budget("tokenizer"),
                               lambda d: argv(d, self.p.calib / "data" / "images", CALIBRATION_STEPS, None,
                                              ["train.log_every=1"]), self.plan.batch)
        shutil.rmtree(run, ignore_errors=True)
        mapping = {str(e.unlabelled): PLACEHOLDERS["unlabelled"], str(e.val): PLACEHOLDERS["val_images"],
                   str(self.p.runs): "runs"}
        self._run(st, argv(run, e.unlabelled, steps, e.val), mapping, self.clock.hidden(steps))
        self.clock.check_plan(st, run, self.plan.batch)
        self.tok_eval = self._run(st, ["tokenizer", "eval", "--tokenizer", str(run), "--data", str(e.val),
                                       "--grid", str(run / "eval_grid.png")], mapping)
        st.steps, st.seconds = steps, time.perf_counter() - t

    @property
    def method_title(self) -> str:
        return method_name(self.method)

    def pretrain(self) -> None:
        st = self._stage("pretrain", f"{self.method_title} pretraining")
        t = time.perf_counter()
        e, run = self.embedded, self.p.runs / "pretrain"
        tok = ["--tokenizer", str(self.p.runs / "tokenizer")] if self.uses_tokenizer else []
        preset = method_registry.get(self.method).default_preset

        def argv(out: Path, data: Path, steps: int, extra=()) -> list[str]:
            return ["pretrain", "--method", self.method, "--data", str(data), *tok, "--out", str(out),
                    "--preset", preset, "--steps", str(steps), "--batch-size", str(self.plan.batch),
                    *self.common, *self.arch, *self.pre_recipe, *extra]

        steps = self.clock.steps_for(st, self.clock.budget("pretrain"),
                               lambda d: argv(d, self.p.calib / "data" / "images", CALIBRATION_STEPS,
                                              ["train.log_every=1"]), self.plan.batch,
                               wanted=self.clock.wanted(PRETRAIN_STEPS_WANTED, PRETRAIN_MAX_SHARE))
        shutil.rmtree(run, ignore_errors=True)
        self.pre_out = self._run(st, argv(run, e.unlabelled, steps),
                                 {str(e.unlabelled): PLACEHOLDERS["unlabelled"], str(self.p.runs): "runs"},
                                 self.clock.hidden(steps))
        self.clock.check_plan(st, run, self.plan.batch)
        st.steps, st.seconds = steps, time.perf_counter() - t

    def _finetune_argv(self, out: Path, data: Path, init: str, steps: int, lpc: int, extra=()) -> list[str]:
        arch = self.arch if init == "none" else []  # a checkpoint brings its own architecture
        return ["finetune", "--data", str(data), "--init", init, "--out", str(out), "--preset", PRESET,
                "--labels-per-class", str(lpc), "--steps", str(steps), "--batch-size", str(self.plan.batch),
                *self.common, f"train.eval_every={max(1, math.ceil(steps / 2))}", *arch, *FINETUNE_RECIPE, *extra]

    def finetune(self, which: str) -> None:
        """``which``: "pretrained" (from the pretraining run) or "scratch" (``--init none``, same steps)."""
        scratch = which == "scratch"
        name = f"finetune_{which}"
        st = self._stage(name, "Fine-tuning from scratch" if scratch else f"Fine-tuning the {self.method_title} backbone")
        t = time.perf_counter()
        e = self.embedded
        init = "none" if scratch else str(self.p.runs / "pretrain")
        lpc = self.labels_per_class
        run = self.p.runs / name.replace("_", "-")
        n_val = self.counts["val"]
        if scratch and getattr(self, "_ft_steps", None):
            steps = self._ft_steps  # the same schedule for both, so the comparison is fair
        else:
            steps = self.clock.steps_for(st, self.clock.budget(name),
                                   lambda d: self._finetune_argv(d, self.p.calib / "data" / "labelled", init,
                                                                 CALIBRATION_STEPS, lpc, ["train.log_every=1"]),
                                   self.plan.batch, eval_images=n_val, n_evals=2,
                                   wanted=self.clock.wanted(FINETUNE_STEPS_WANTED, FINETUNE_MAX_SHARE))
            self._ft_steps = steps
        shutil.rmtree(run, ignore_errors=True)
        self._run(st, self._finetune_argv(run, e.root / "labelled", init, steps, lpc),
                  {str(e.root / "labelled"): PLACEHOLDERS["labelled"], str(self.p.runs): "runs"},
                  self.clock.hidden(steps, time_limit=False))
        st.steps, st.seconds = steps, time.perf_counter() - t
        st.notes.append(f"{lpc} labelled images per class ({10 * lpc} in all); validation: {n_val} images")

    def _probe_labels_per_class(self, budget_s: float) -> int:
        if self.plan.smoke:
            return 4
        # feature extraction dominates: size the labelled set to the budget (forward ~ 3x a training step)
        ft = [s for s in self.stages if s.name == "finetune_pretrained" and not s.error]
        rate = 3 * self.plan.batch * max(ft[0].steps, 1) / max(ft[0].seconds, 1e-3) if ft else 200.0
        per_run = budget_s / 2
        return int(max(10, min(200, (per_run * rate - self.counts["val"]) / 10)))

    def _probes(self, st: StageResult, init: str, lpc: int, protocols=("linear", "knn"), tag: str = "",
                pool: str = "mean") -> list:
        e = self.embedded
        mapping = {str(e.root / "labelled"): PLACEHOLDERS["labelled"], str(self.p.runs): "runs"}
        results = []
        for protocol in protocols:
            argv = ["probe", protocol, "--data", str(e.root / "labelled"), "--init", init,
                    "--labels-per-class", str(lpc), "--seed", str(self.seed), "--pool", pool,
                    "--out", str(self.p.runs / f"probe-{protocol}{tag}.json")]
            if protocol == "knn":
                argv += ["--k", str(min(20, 10 * lpc))]
            else:
                argv += ["--steps", "50" if self.plan.smoke else "300"]
            results.append(self._run(st, argv, mapping))
        return results

    def probe(self) -> None:
        st = self._stage("probe", "Frozen-backbone probes")
        t = time.perf_counter()
        lpc = self._probe_lpc = self._probe_labels_per_class(self.clock.budget("probe"))
        # every pooling: the mean of the patch tokens drops the layout that the raw pixels keep
        # (docs/notebook/2026-11-demo.md)
        self._probes(st, str(self.p.runs / "pretrain"), lpc, pool=PROBE_POOLS)
        st.seconds = time.perf_counter() - t
        st.notes.append(f"{lpc} labelled images per class for the probes; validation: {self.counts['val']} images; "
                        "block and pooling (mean, [CLS], 4x4 grid, every token) chosen on a held-out fifth of these labels")

    def baselines(self) -> None:
        """The no-learning floor on the same labels and validation images: linear and k-NN on the raw
        pixels with the probes' labels, and k-NN on the raw pixels with the fine-tuning labels."""
        st = self._stage("baselines", "Raw-pixel baselines")
        t = time.perf_counter()
        lpc = getattr(self, "_probe_lpc", None) or self._probe_labels_per_class(self.clock.shares["probe"] * self.plan.minutes * 60)
        self._probes(st, "pixels", lpc, tag="-pixels")
        self._probes(st, "pixels", self.labels_per_class, ("knn",), tag=f"-pixels-{self.labels_per_class}")
        st.seconds = time.perf_counter() - t
        st.notes.append(f"flattened, normalised pixels: {lpc} labelled images per class (as the probes) and "
                        f"{self.labels_per_class} (as the fine-tuning); validation: {self.counts['val']} images")

    def segment(self) -> None:
        st = self._stage("segment", "Semantic segmentation")
        t = time.perf_counter()
        e, run = self.embedded, self.p.runs / "segment"
        pretrained = str(self.p.runs / "pretrain")

        def argv(out: Path, data: Path, steps: int, extra=(), init: str = pretrained) -> list[str]:
            return ["segment", "--data", str(data), "--init", init, "--out", str(out), "--preset", PRESET,
                    "--num-classes", "11", "--steps", str(steps), "--batch-size", str(self.plan.seg_batch),
                    *self.common, f"train.eval_every={max(1, math.ceil(steps / 2))}", *extra]

        # half the stage's budget each: the pretrained backbone, then the same schedule from scratch (its baseline)
        steps = self.clock.steps_for(st, self.clock.budget("segment") / 2,
                               lambda d: argv(d, self.p.calib / "data" / "seg", CALIBRATION_STEPS,
                                              ["train.log_every=1"]),
                               self.plan.seg_batch, eval_images=self.counts.get("seg_val", 0), n_evals=1)
        mapping = {str(e.seg): PLACEHOLDERS["seg"], str(self.p.runs): "runs"}
        for out in (run, self.p.runs / "segment-scratch"):
            shutil.rmtree(out, ignore_errors=True)
        self._run(st, argv(run, e.seg, steps), mapping, self.clock.hidden(steps, time_limit=False))
        self._run(st, argv(self.p.runs / "segment-scratch", e.seg, steps, self.arch, init="none"), mapping,
                  self.clock.hidden(steps, time_limit=False))
        # the floor: every pixel the most frequent training class (background), on the same validation canvases
        self.seg_constant = constant_baseline(e.seg, splits=("val",))
        st.steps, st.seconds = steps, time.perf_counter() - t

    def pictures(self) -> None:
        st = self._stage("pictures", "Inside the model")
        t = time.perf_counter()
        e = self.embedded
        pics = self.p.runs / "pictures"
        pics.mkdir(parents=True, exist_ok=True)
        pre, tok = str(self.p.runs / "pretrain"), str(self.p.runs / "tokenizer")
        classes = sorted(p for p in e.val.iterdir() if p.is_dir())
        images = [list_images(classes[i])[0] for i in (0, 7, 9) if i < len(classes)]
        # what the pretrained model predicts for masked patches: tokens decoded by the tokenizer (BEiT), pixels (MAE)
        masked = ["mim", "--tokenizer", tok] if self.uses_tokenizer else [self.method]
        self.pictures_made: dict[str, list[Path]] = {"attention": [], "masked": []}
        for k, img in enumerate(images):
            mapping = {str(img): PLACEHOLDERS["image"], str(self.p.runs): "runs"}
            out = pics / f"attention-{k}.png"
            self._run(st, ["show", "attention", "--init", pre, "--image", str(img), "--out", str(out)], mapping)
            self.pictures_made["attention"].append(out)
            out = pics / f"masked-{k}.png"
            self._run(st, ["show", masked[0], "--init", pre, *masked[1:], "--image", str(img), "--out", str(out),
                           "--seed", str(k)], mapping)
            self.pictures_made["masked"].append(out)
        # one of each command is enough to show the user
        st.commands = st.commands[:2]
        st.seconds = time.perf_counter() - t

    # ---- driver

    def run(self) -> Path:
        steps = [("data", self.prepare_data), ("tokenizer", self.tokenizer), ("pretrain", self.pretrain),
                 ("finetune_pretrained", lambda: self.finetune("pretrained")),
                 ("finetune_scratch", lambda: self.finetune("scratch")),
                 ("probe", self.probe), ("baselines", self.baselines), ("segment", self.segment),
                 ("pictures", self.pictures)]
        if not self.uses_tokenizer:
            steps = [s for s in steps if s[0] != "tokenizer"]
        tok = {"tokenizer"} if self.uses_tokenizer else set()
        needs = {"pretrain": tok, "finetune_pretrained": {"pretrain"}, "probe": {"pretrain"},
                 "segment": {"pretrain"}, "pictures": {"pretrain"} | tok}
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
        return write_demo_report(self, summary)

    # ---- results

    def stage(self, name: str) -> StageResult | None:
        return next((s for s in self.stages if s.name == name), None)

    def result(self, name: str) -> StageResult:
        """The stage's result, or an empty one marked "not run"."""
        return self.stage(name) or StageResult(name, name, error="not run")

    @property
    def labels_per_class(self) -> int:
        """Labelled images per class for fine-tuning."""
        return 4 if self.plan.smoke else LABELS_PER_CLASS

    def summary(self) -> dict:
        """Numbers of every stage (``None`` where a stage failed), timings and the plan, as JSON."""
        def out(name: str, i: int = 0) -> dict:
            st = self.stage(name)
            o = st.outputs[i] if st is not None and len(st.outputs) > i else None
            return o if isinstance(o, dict) else {}

        tok = out("tokenizer", 1)
        pre = out("pretrain")
        ft = {w: (out(f"finetune_{w}").get("best") or {}) for w in ("pretrained", "scratch")}
        probes = {p: (out("probe", i).get("best") or {}) for i, p in enumerate(("linear", "knn"))}
        pixels = {p: (out("baselines", i).get("best") or {}) for i, p in enumerate(("linear", "knn", "knn_ft"))}
        seg = out("segment").get("best") or {}
        seg_scratch = out("segment", 1).get("best") or {}
        constant = getattr(self, "seg_constant", {}).get("val") or {}
        return {
            "method": self.method,
            "seed": self.seed,
            "tokenizer": {k: tok.get(k) for k in ("psnr", "codebook_usage", "perplexity")},
            # the command's JSON names its running training metrics train_* (beit.cli.common.result_dict)
            "pretrain": {k: pre.get(f"train_{k}", pre.get(k)) for k in ("loss", "mlm_acc", "step")},
            "finetune": {w: {"top1": ft[w].get("top1"), "top5": ft[w].get("top5")} for w in ft},
            "probe": {p: {k: probes[p].get(k) for k in ("top1", "layer", "pool")} for p in probes},
            # the no-learning floor: raw-pixel probes with the probes' labels (linear, knn) and the
            # fine-tuning's labels (knn_ft), same validation images
            "pixels": {p: {"top1": pixels[p].get("top1"), "top5": pixels[p].get("top5")} for p in pixels},
            "segment": {k: seg.get(k) for k in ("mIoU", "pixel_acc", "mAcc")},
            # its baselines on the same validation canvases: the same schedule from random weights, and the constant
            # prediction (every pixel the most frequent training class)
            "segment_baselines": {"scratch": {k: seg_scratch.get(k) for k in ("mIoU", "pixel_acc", "mAcc")},
                                  "constant": {k: constant.get(k) for k in ("mIoU", "pixel_acc", "mAcc")}},
            "stages": [{"name": s.name, "seconds": round(s.seconds, 1), "steps": s.steps, "error": s.error}
                       for s in self.stages],
            "total_seconds": round(self.total_seconds, 1),
            "minutes": self.plan.minutes,
            "data": getattr(self, "counts", {}),
            "full_model": self.plan.full_model,
            "precision": run_precisions(self.p.runs),
            "machine": machine.describe(),
        }

def run_precisions(runs: Path) -> dict[str, str]:
    """``{run: precision}`` as each training run resolved it (``train.precision`` in its config.yaml)."""
    out = {}
    for cfg in sorted(runs.glob("*/config.yaml")):
        train = (yaml.safe_load(cfg.read_text()) or {}).get("train") or {}
        if "precision" in train:
            out[cfg.parent.name] = train["precision"]
    return out


# --------------------------------------------------------------------------------------------- entry point


def run_demo(out: str | Path = "runs/demo", minutes: float = 10.0, *, run_command: Runner, full_model: bool = False,
             seed: int = 0, method: str = DEFAULT_METHOD) -> tuple[Path, dict]:
    """Run the demo, each step through ``run_command`` (``beit demo`` hands it :func:`beit.cli.run_command`);
    returns ``(report path, summary)`` (see the module docstring)."""
    if minutes <= 0:
        raise ConfigError(f"--minutes must be > 0, got {minutes}")
    demo = Demo(out, minutes, full_model=full_model, seed=seed, method=method, run_command=run_command)
    report = demo.run()
    return report, json.loads((demo.p.out / "summary.json").read_text())


__all__ = ["Demo", "Runner", "run_demo", "run_precisions"]
