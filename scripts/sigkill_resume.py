"""SIGKILL a real ``beit pretrain`` (or tokenizer training, or fine-tuning) at random points, again and
again, then let ``--resume`` finish it.

    python scripts/sigkill_resume.py [--command pretrain|tokenizer|finetune] [--kills 10] [--seed 0]
                                     [--steps 200] [--keep DIR] [--no-reference]

Each round resumes the run (``--resume-or-start``: the first round starts it) and kills it at a random point: right after a random optimiser
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
SHARED = ["--batch-size", "4", "--precision", "fp32", "train.num_workers=0", "train.ckpt_every=4",
          "train.log_every=1"]
TINY = {  # command -> its words and tiny settings (flags and key=value overrides)
    "pretrain": (["pretrain"], ["--method", "mae", "model.depth=2", "model.embed_dim=32", "model.num_heads=2",
                                "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2"]),
    "tokenizer": (["tokenizer", "train"], ["--preset", "vq_32", "model.n_hid=16", "model.vocab_size=16",
                                           "model.embed_dim=8", "model.n_init=16"]),
    "finetune": (["finetune"], ["--init", "none", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
                                "model.img_size=32", "model.patch_size=8", "train.eval_every=3"]),
}


def make_data(root: Path, n: int = 16, labelled: bool = False) -> Path:
    """``n`` random 32 px images in ``root``; ``labelled``: as ``root/{train,val}/{a,b}/`` (fine-tuning)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folders = [root / s / c for s in ("train", "val") for c in ("a", "b")] if labelled else [root]
    for k, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n // 2 if labelled and k < 2 else 2 if labelled else n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def command(data: Path, out: Path, steps: int, when: str, which: str = "pretrain") -> list[str]:
    words, tiny = TINY[which]
    flags = [a for a in [*tiny, *SHARED] if "=" not in a]
    pairs = [a for a in [*tiny, *SHARED] if "=" in a]
    return [sys.executable, "-m", "tests.helpers.kill_driver", when, *words, "--data", str(data),
            "--out", str(out), "--steps", str(steps), "--resume-or-start", *flags, *pairs]


def steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            steps.append(-1)  # a torn line
            continue
        if "loss" in row:  # a training step (validation rows share its step number)
            steps.append(row["step"])
    return steps


def one_round(data: Path, out: Path, steps: int, rng: random.Random, env: dict, t_full: float,
              which: str = "pretrain") -> dict:
    """Resume the run and kill it at a random point; returns what happened."""
    done = min(max([s for s in steps_logged(out) if s > 0], default=0), steps - 1)
    mode = rng.choice(["step", "save", "line", "timer"])
    when = {"step": f"step:{min(steps - 1, done + rng.randint(1, 6))}", "save": f"save:{rng.randint(1, 2)}",
            "line": f"line:{rng.randint(1, 8)}", "timer": "0"}[mode]
    p = subprocess.Popen(command(data, out, steps, when, which), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
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
    ap.add_argument("--command", choices=sorted(TINY), default="pretrain", help="what to train and kill")
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    ap.add_argument("--no-reference", action="store_true", help="skip the uninterrupted run (and the loss check)")
    a = ap.parse_args(argv)
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="sigkill-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    rng = random.Random(a.seed)
    data, ref, out = make_data(work / "data", labelled=a.command == "finetune"), work / "reference", work / "run"
    t0 = time.perf_counter()
    t_full = 10.0
    if not a.no_reference:
        subprocess.run(command(data, ref, a.steps, "0", a.command), env=env, check=True, capture_output=True)
        t_full = time.perf_counter() - t0  # how long a whole run takes here: timer kills land within it
    rounds = [one_round(data, out, a.steps, rng, env, t_full, a.command) for _ in range(a.kills)]
    final = subprocess.run(command(data, out, a.steps, "0", a.command), env=env, capture_output=True, text=True)
    logged = steps_logged(out)
    losses = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    ref_losses = losses if a.no_reference else {
        r["step"]: r["loss"] for r in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
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
