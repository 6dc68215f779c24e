"""The GPU check: every CUDA code path of beit in one run, results in one JSON file.

    python scripts/gpu_check.py --out gpu_check.json            # on a CUDA machine (~6 min: --budget-s 360)
    python scripts/gpu_check.py --out dry.json --dry-run        # the same steps on CPU, CUDA-only ones skipped

Steps (each a subprocess with its own timeout; a failure is recorded and the next step runs; no new step
starts after ``--budget-s``, 360 s by default, so that one call fits a lent GPU's time with room to rerun):
environment, tiny data folders written from the shipped Fashion-MNIST images (no network), the CUDA-marked
tests (FlexAttention vs SDPA in fp32/bf16 with gradients, half-precision steps, the tokenizer's side-stream
overlap), then the measurements: ``bench/pretrain_step.py`` against HF at base/224 (with MFU against the
card's datasheet peak and the largest batch that fits for base and large in the auto precision),
``bench/tokenizer_encode.py`` (the DALL-E-sized tokenizer's fp32 / bf16 / fp16 encode and its share of the
base/224 step, serial and on a side stream) and ``bench/loader.py`` (images/s per CPU core of each loader
path against torchvision's); then the commands: a tokenizer, BEiT/MAE/iBOT pretraining in bf16 and fp16
(gradient scaler), fine-tuning, segmentation, torchrun with one process (nccl), resume after SIGKILL. The
JSON is rewritten after every step, so a run cut short still leaves its results. Exit status 1 if any step
failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Step:
    name: str
    status: str = "pending"  # pass | fail | skipped
    seconds: float = 0.0
    command: str = ""
    details: dict = field(default_factory=dict)
    output_tail: str = ""


class Check:
    """Runs the steps in order against a time budget, recording each in ``self.steps`` and the JSON file."""

    def __init__(self, out: Path, work: Path, dry_run: bool, budget_s: float, only: list[str] | None = None) -> None:
        self.out, self.work, self.dry, self.budget, self.only = out, work, dry_run, budget_s, only
        self.t0 = time.perf_counter()
        self.steps: list[Step] = []
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                        PYTHONUNBUFFERED="1")
        self.device = "cpu" if dry_run else "cuda"
        self.header: dict = {"dry_run": dry_run, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    # ---- bookkeeping

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def save(self) -> None:
        counts = {s: sum(st.status == s for st in self.steps) for s in ("pass", "fail", "skipped")}
        doc = {**self.header, "total_seconds": round(time.perf_counter() - self.t0, 1), "summary": counts,
               "steps": [asdict(s) for s in self.steps]}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(doc, indent=1) + "\n")

    def skip(self, name: str, why: str) -> Step:
        st = Step(name, "skipped", details={"why": why})
        print(f"[skip] {name}: {why}", flush=True)
        self.steps.append(st)
        self.save()
        return st

    def run(self, name: str, argv: list[str], timeout: float, cuda_only: bool = False, check=None,
            expect_rc: int = 0, notes=None) -> Step:
        """Run ``argv`` (a subprocess, its own process group); ``check(step, output)`` may add details or fail it;
        ``notes(step, output)`` adds details whatever the outcome."""
        if self.only and not any(name.startswith(o) for o in self.only):
            return self.skip(name, "not selected (--only)")
        if cuda_only and self.dry:
            return self.skip(name, "dry run: needs CUDA")
        if self.left() < 10:
            return self.skip(name, f"over the time budget ({self.budget:.0f} s)")
        st = Step(name, command=" ".join(argv))
        print(f"[run ] {name}: {st.command}", flush=True)
        t = time.perf_counter()
        slack = 3 if self.dry else 1  # the dry run shares a small CPU with the rest of CI
        output, rc = _run(argv, self.env, min(slack * timeout, self.left()))
        st.seconds = round(time.perf_counter() - t, 1)
        st.output_tail = output[-3000:]
        st.details["returncode"] = rc
        st.status = "pass" if rc == expect_rc else "fail"
        if notes is not None:
            notes(st, output)
        if check is not None and st.status == "pass":
            try:
                check(st, output)
            except Exception as e:  # noqa: BLE001 - a failed check is a failed step, never a lost run
                st.status, st.details["check"] = "fail", f"{type(e).__name__}: {e}"
        print(f"[{st.status}] {name} ({st.seconds} s)" + ("" if st.status == "pass" else "\n" + st.output_tail[-1500:]),
              flush=True)
        self.steps.append(st)
        self.save()
        return st


def _run(argv: list[str], env: dict, timeout: float) -> tuple[str, int]:
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1))
        return out, proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return out + f"\n[timed out after {timeout:.0f} s]", 124


# --------------------------------------------------------------------------------------------- checks on runs


def metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def training_check(run: Path, steps: int, precision: str | None = None):
    """The run logged ``steps`` finite losses (in ``precision``); its last values go into the details."""
    import math

    def check(st: Step, _out: str) -> None:
        rows = [r for r in metrics(run) if "loss" in r]
        losses = [r["loss"] for r in rows]
        st.details.update(steps=len(rows), first_loss=losses[0] if losses else None,
                          last_loss=losses[-1] if losses else None,
                          images_per_s=rows[-1].get("images_per_s") if rows else None,
                          precision=rows[-1].get("precision") if rows else None)
        evals = [r for r in metrics(run) if any(k.startswith("val_") for k in r)]
        if evals:
            st.details["last_eval"] = {k: v for k, v in evals[-1].items() if k.startswith("val_")}
        assert len(rows) == steps, f"{len(rows)} logged steps, expected {steps}"
        assert all(math.isfinite(x) for x in losses), f"non-finite loss: {losses}"
        if precision is not None:
            assert st.details["precision"] == precision, f"ran in {st.details['precision']}, asked {precision}"

    return check


# --------------------------------------------------------------------------------------------- the steps


def environment(c: Check) -> None:
    import importlib.util

    import torch

    sys.path.insert(0, str(ROOT))
    from beit import machine

    missing = [m for m in ("safetensors", "yaml", "tqdm", "PIL", "matplotlib", "pytest", "transformers")
               if importlib.util.find_spec(m) is None]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "machine": machine.info(dev),
            "describe": machine.describe(dev), "missing_modules": missing}
    if torch.cuda.is_available():
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    c.header["environment"] = info
    st = Step("environment", "pass", details=info)
    if not c.dry and not torch.cuda.is_available():
        st.status, st.details["why"] = "fail", "torch.cuda.is_available() is False (use --dry-run on CPU)"
    print(f"[{st.status}] environment: {info['describe']}; missing modules: {missing or 'none'}", flush=True)
    c.steps.append(st)
    c.save()


def data(c: Check) -> Path:
    sys.path.insert(0, str(ROOT))
    from beit.data.embedded import materialize

    t = time.perf_counter()
    root = c.work / "data"
    e = materialize(root, unlabelled_per_class=26 if not c.dry else 4, labels_per_class=4, val_per_class=2,
                    seg_train=16, seg_val=4)
    c.steps.append(Step("data", "pass", round(time.perf_counter() - t, 1), details=e.counts()))
    c.save()
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="the JSON results file")
    ap.add_argument("--work", help="scratch folder for data and runs (default: TMPDIR/beit_gpu_check, so that "
                                   "checkpoints never land beside the results)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes; CUDA-only steps skipped with a message")
    ap.add_argument("--budget-s", type=float, default=360.0,
                    help="no new step starts after this many seconds (default: one short call of a lent GPU)")
    ap.add_argument("--only", help="comma-separated step names (or their beginnings) to run, e.g. "
                                   "'pytest,pretrain_mae,torchrun'; the others are recorded as skipped. A step that "
                                   "needs another's output (BEiT needs the tokenizer) needs it selected too")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    work = Path(a.work).resolve() if a.work else Path(tempfile.gettempdir()) / "beit_gpu_check"
    shutil.rmtree(work / "runs", ignore_errors=True)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    c = Check(out, work, a.dry_run, a.budget_s, [o.strip() for o in a.only.split(",")] if a.only else None)
    environment(c)
    root = data(c)
    plan(c, root, work / "runs")
    c.save()
    failed = [s.name for s in c.steps if s.status == "fail"]
    print(f"gpu_check: {len(c.steps)} steps, failed: {', '.join(failed) or 'none'}; results in {out}")
    return 1 if failed else 0


def plan(c: Check, root: Path, runs: Path) -> None:
    """The steps in order of importance (the budget may cut the tail): CUDA tests, the benchmarks, then the
    training commands."""
    py, beit = sys.executable, [sys.executable, "-m", "beit"]
    S = dict(steps=30, batch=64, workers=4, ddp_steps=10) if not c.dry else dict(steps=2, batch=8, workers=0, ddp_steps=2)
    common = ["--device", c.device, "--workers", str(S["workers"]), "train.log_every=1"]
    # no:logging: torch.compile's DEBUG records would fill the output and hide the failures
    c.run("pytest_cuda", [py, "-m", "pytest", "-q", "-rA", "-s", "--tb=short", "-p", "no:xdist", "-p", "no:logging",
                          "-m", "cuda", "tests/gpu/test_cuda.py", "tests/models/test_attention.py"], 300, cuda_only=True,
          notes=_pytest_failures)
    # the measurements issue 30 waits for (MFU, largest batch, tokenizer share, loader) before the functional
    # steps that earlier GPU runs already passed: a call cut by the budget still brings them back
    bench(c, py)
    att = c.work / "attention.json"
    c.run("attention_kernels", [py, "bench/attention_kernels.py", "--json", str(att), *(["--small"] if c.dry else [])],
          150, check=_attention_summary(att))
    tok = runs / "tok"
    c.run("tokenizer", [*beit, "tokenizer", "train", "--data", str(root / "unlabelled"), "--out", str(tok),
                        "--preset", "vq_32", "--steps", str(S["steps"]), "--batch-size", str(S["batch"]), *common],
          90, check=training_check(tok, S["steps"]))

    def pretrain_argv(method: str, prec: str, out: Path, steps: int, *extra: str) -> list[str]:
        t = ["--tokenizer", str(tok)] if method == "beit" else []
        return ["pretrain", "--method", method, "--data", str(root / "unlabelled"), *t, "--out", str(out),
                "--steps", str(steps), "--batch-size", str(S["batch"]), "--precision", prec, *common, *extra]

    first = runs / "beit_bf16"
    c.run("pretrain_beit_bf16", [*beit, *pretrain_argv("beit", "bf16", first, S["steps"])], 120,
          check=training_check(first, S["steps"], "bf16"))
    downstream(c, root, runs, first, beit, S, common)
    for method, prec in (("beit", "fp16"), ("mae", "bf16"), ("mae", "fp16"), ("ibot", "bf16"), ("ibot", "fp16")):
        run = runs / f"{method}_{prec}"
        c.run(f"pretrain_{method}_{prec}", [*beit, *pretrain_argv(method, prec, run, S["steps"])], 120,
              cuda_only=prec == "fp16", check=training_check(run, S["steps"], prec))
    ddp = runs / "torchrun"
    c.run("torchrun_1proc", [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "beit",
                             *pretrain_argv("beit", "auto", ddp, S["ddp_steps"])], 150,
          check=_all(training_check(ddp, S["ddp_steps"]), _backend_check("gloo" if c.dry else "nccl")))
    kill, every, total = (12, 5, 20) if not c.dry else (3, 2, 4)
    resume(c, runs, beit, lambda out, steps: pretrain_argv("beit", "auto", out, steps, f"train.ckpt_every={every}"),
           kill, every, total)


def _pytest_failures(st: Step, out: str) -> None:
    """The failed tests and their error lines, in the details (pytest's own summary, ``-rA --tb=short``)."""
    st.details["failures"] = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR", "E   "))][:40]


def _attention_summary(path: Path):
    def check(st: Step, _out: str) -> None:
        doc = json.loads(path.read_text())
        st.details["accuracy"] = doc["accuracy"]
        st.details["timing"] = doc["timing"]

    return check


def _all(*checks):
    def check(st: Step, out: str) -> None:
        for ch in checks:
            ch(st, out)

    return check


def _backend_check(backend: str):
    def check(st: Step, out: str) -> None:
        st.details["backend"] = backend if f"backend {backend}" in out else "not found in the log"
        assert f"backend {backend}" in out, f"the log does not say 'backend {backend}'"

    return check


def downstream(c: Check, root: Path, runs: Path, init: Path, beit: list[str], S: dict, common: list[str]) -> None:
    n = max(2, S["steps"] // 3)
    ft, seg = runs / "finetune", runs / "segment"
    c.run("finetune", [*beit, "finetune", "--data", str(root / "labelled"), "--init", str(init), "--out", str(ft),
                       "--preset", "beit_tiny_patch4_32", "--steps", str(n), "--batch-size", str(min(S["batch"], 32)),
                       *common], 120, check=training_check(ft, n))
    c.run("segment", [*beit, "segment", "--data", str(root / "seg"), "--init", str(init), "--out", str(seg),
                      "--preset", "beit_tiny_patch4_32", "--num-classes", "11", "--steps", str(n),
                      "--batch-size", "8", *common], 120, check=training_check(seg, n))


def resume(c: Check, runs: Path, beit: list[str], argv, kill: int, every: int, total: int) -> None:
    """SIGKILL right after step ``kill`` (checkpoints every ``every``), resume to ``total``; compare with an
    uninterrupted run."""
    cut, full = runs / "resume_cut", runs / "resume_full"
    killer = [sys.executable, "-m", "tests.helpers.kill_driver", str(kill)]
    c.run(f"resume_kill_at_step_{kill}", [*killer, *argv(cut, total)], 120, expect_rc=-signal.SIGKILL)
    saved = kill // every * every

    def compare(st: Step, out: str) -> None:
        assert "resumed from" in out and f"step_{saved:08d}" in out, f"did not resume from step {saved}"
        training_check(cut, total)(st, out)
        steps = [r["step"] for r in metrics(cut) if "loss" in r]
        assert steps == list(range(1, total + 1)), f"logged steps {steps}"
        ref = {r["step"]: r["loss"] for r in metrics(full) if "loss" in r} if (full / "metrics.jsonl").exists() else {}
        got = {r["step"]: r["loss"] for r in metrics(cut) if "loss" in r}
        if ref:  # informational: CUDA kernels need not be bitwise deterministic
            st.details["max_abs_loss_diff_vs_uninterrupted"] = max(abs(got[s] - ref[s]) for s in ref if s in got)

    c.run("resume_full_reference", [*beit, *argv(full, total)], 120, check=training_check(full, total))
    c.run("resume_after_sigkill", [*beit, *argv(cut, total), "--resume"], 120, check=compare)


def bench(c: Check, py: str) -> None:
    out = c.work / "bench.json"
    if c.dry:
        argv = [py, "bench/pretrain_step.py", "--configs", "tiny", "--dtype", "auto", "--iters", "1", "--warmup", "0",
                "--batch", "4", "--json", str(out)]
    else:
        argv = [py, "bench/pretrain_step.py", "--configs", "base", "--device", "cuda", "--dtype", "auto,fp32,bf16,fp16",
                "--batch", "64", "--iters", "10", "--warmup", "3", "--json", str(out),
                "--largest-batch", "beit_base_patch16_224,beit_large_patch16_224"]

    def check(st: Step, _out: str) -> None:
        doc = json.loads(out.read_text())
        keep = ("config", "dtype", "label", "batch", "ours_img_s", "hf_img_s", "ours_over_hf", "tokenizer_s",
                "tokenizer_share", "ours_plus_tokenizer_img_s", "gflop_per_image", "mfu", "mfu_vs_matmul")
        st.details.update(machine=doc["machine"], auto=doc["auto"], rows=[{k: r[k] for k in keep} for r in doc["rows"]],
                          largest_batch=doc["largest_batch"])

    c.run("bench_pretrain_step", argv, 420, check=check)
    tok = c.work / "tokenizer_encode.json"
    if c.dry:
        argv = [py, "bench/tokenizer_encode.py", "--dry-run", "--json", str(tok)]
    else:  # the DALL-E-sized dVAE (random weights: speed and the overlap; agreement needs the real weights)
        argv = [py, "bench/tokenizer_encode.py", "--device", "cuda", "--preset", "dalle_112", "--batch", "64",
                "--images", "512", "--dtypes", "bf16,fp16", "--rounds", "5", "--step", "beit_base_patch16_224",
                "--json", str(tok)]

    def tok_check(st: Step, _out: str) -> None:
        doc = json.loads(tok.read_text())
        st.details.update(rows=doc["rows"], step=doc["step"])
        assert doc["step"]["overlap_same_loss"], "the overlapped encode changed the loss"

    c.run("bench_tokenizer_encode", argv, 240, check=tok_check)
    loader = c.work / "loader.json"

    def loader_check(st: Step, _out: str) -> None:
        st.details.update(json.loads(loader.read_text()))

    c.run("bench_loader", [py, "bench/loader.py", "--json", str(loader), "--work", str(c.work / "loader"),
                           *(["--dry-run"] if c.dry else [])], 240, check=loader_check)


if __name__ == "__main__":
    sys.exit(main())
