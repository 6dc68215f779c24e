"""SIGKILL a real ``beit pretrain`` at random points, again and again, then let ``--resume`` finish it.

    python scripts/sigkill_resume.py [--kills 10] [--seed 0] [--steps 200] [--keep DIR] [--no-reference]

Each round resumes the run (``--resume``) and kills it at a random point: right after a random optimiser
step (a few past the last one logged), in the middle of a checkpoint write (between its files), in the
middle of a line of metrics.jsonl, or after a random wall-clock delay (1 s to 60% of the time the rest of
the run takes: loading or training). A last ``--resume`` runs to the end. The run must then hold every step
exactly once in metrics.jsonl, no ``.tmp-*``/``.old-*`` leftovers, and the same losses as an uninterrupted
run (exact resume), with every round killed. Prints one JSON object; exit status 0 when everything holds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--method", "mae", "--batch-size", "4", "--precision", "fp32", "model.depth=2", "model.embed_dim=32",
        "model.num_heads=2", "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2",
        "train.num_workers=0", "train.ckpt_every=4", "train.log_every=1"]


def make_data(root: Path, n: int = 16) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def command(data: Path, out: Path, steps: int, when: str) -> list[str]:
    flags = [a for a in TINY if "=" not in a]
    pairs = [a for a in TINY if "=" in a]
    return [sys.executable, "-m", "tests.helpers.kill_driver", when, "pretrain", "--data", str(data),
            "--out", str(out), "--steps", str(steps), "--resume", *flags, *pairs]


def steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError, TypeError):
            steps.append(-1)  # a torn line
    return steps


def one_round(data: Path, out: Path, steps: int, rng: random.Random, env: dict, t_full: float) -> dict:
    """Resume the run and kill it at a random point; returns what happened."""
    done = min(max([s for s in steps_logged(out) if s > 0], default=0), steps - 1)
    mode = rng.choice(["step", "save", "line", "timer"])
    when = {"step": f"step:{min(steps - 1, done + rng.randint(1, 6))}", "save": f"save:{rng.randint(1, 2)}",
            "line": f"line:{rng.randint(1, 8)}", "timer": "0"}[mode]
    p = subprocess.Popen(command(data, out, steps, when), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if mode == "timer":
        # loading or training, within 60% of what is left of the run (never past its end)
        delay = rng.uniform(1.0, max(2.0, 0.6 * t_full * (steps - done) / steps))
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
    _, err = p.communicate(timeout=600)
    return {"mode": when if mode != "timer" else f"timer:{delay:.1f}s", "returncode": p.returncode,
            "error": err.decode(errors="replace").strip().splitlines()[-1:] if p.returncode not in (0, -9) else []}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    ap.add_argument("--no-reference", action="store_true", help="skip the uninterrupted run (and the loss check)")
    a = ap.parse_args(argv)
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="sigkill-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    rng = random.Random(a.seed)
    data, ref, out = make_data(work / "data"), work / "reference", work / "run"
    t0 = time.perf_counter()
    t_full = 10.0
    if not a.no_reference:
        subprocess.run(command(data, ref, a.steps, "0"), env=env, check=True, capture_output=True)
        t_full = time.perf_counter() - t0  # how long a whole run takes here: timer kills land within it
    rounds = [one_round(data, out, a.steps, rng, env, t_full) for _ in range(a.kills)]
    final = subprocess.run(command(data, out, a.steps, "0"), env=env, capture_output=True, text=True)
    logged = steps_logged(out)
    losses = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    ref_losses = losses if a.no_reference else {
        r["step"]: r["loss"] for r in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines())}
    leftovers = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                       if p.name.startswith((".tmp-", ".old-")) or re.search(r"\.tmp\d+(\.|$)", p.name))
    result = {
        "kills": sum(r["returncode"] == -signal.SIGKILL for r in rounds), "rounds": rounds,
        "final_returncode": final.returncode, "steps_once": logged == list(range(1, a.steps + 1)),
        "leftovers": leftovers, "same_losses_as_uninterrupted": None if a.no_reference else losses == ref_losses,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    result["ok"] = (final.returncode == 0 and result["steps_once"] and not leftovers and result["kills"] == a.kills
                    and result["same_losses_as_uninterrupted"] is not False)
    print(json.dumps(result))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
