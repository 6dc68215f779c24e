"""The fault catalogue, signals and exit status (issue 26, cases 7, 11, 12; the SIGKILL rounds of case 8).

Real ``beit`` processes, signalled once they are training (their first line in metrics.jsonl): an
interrupted run saves, then exits with 128 + the signal (130 Ctrl-C, 143 SIGTERM), never 0, so
``beit pretrain ... && beit finetune ...`` stops; a second Ctrl-C stops at once with one line; the run lock
dies with the main process even while its DataLoader workers live on.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.test_catalogue import pretrain
from tests.helpers.paths import ROOT

ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("signals") / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def start(args: list) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "beit", *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_training(p: subprocess.Popen, out: Path, timeout: float = 240) -> None:
    """Until the run has logged a step (it is in the training loop, its signal handlers installed)."""
    t0 = time.monotonic()
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() - t0 < timeout, "the run did not start training"
        time.sleep(0.05)


def long_run(data: Path, out: Path, *extra: str) -> list:
    return pretrain(data, out, 100_000, "--json", *extra)  # never reaches its end here: it is stopped


def steps_saved(out: Path) -> list[int]:
    return sorted(int(p.name.split("_")[-1]) for p in (out / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_interrupted_run_saves_then_exits_non_zero(data, tmp_path, sig, code):
    out = tmp_path / "run"
    p = start(long_run(data, out, "train.ckpt_every=1000"))
    wait_training(p, out)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=240)
    assert p.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "interrupted"
    assert steps_saved(out) == [summary["step"]]  # saved where it stopped (ckpt_every is far away)


def test_second_ctrl_c_stops_at_once_without_a_traceback(data, tmp_path):
    out = tmp_path / "run"
    p = start(long_run(data, out))
    wait_training(p, out)
    p.send_signal(signal.SIGINT)
    # the second Ctrl-C only once the first was handled: two sent while the main thread sits in one long C
    # call (a loaded CI machine) reach Python as one, and the run then stops the ordinary way
    seen = ""
    while "received SIGINT" not in seen:
        line = p.stderr.readline()
        assert line, seen  # the run ended before it acknowledged the first Ctrl-C
        seen += line
    p.send_signal(signal.SIGINT)
    _, rest = p.communicate(timeout=240)
    stderr = seen + rest
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("beit: interrupted"), stderr


def test_lock_dies_with_the_main_process_not_its_loader_workers(data, tmp_path):
    """kill -9 of a run with DataLoader workers: the lock is free at once (the workers, still alive for a few
    seconds, used to keep it: "--resume refused: in use by pid N" with N dead) and --resume goes on."""
    out = tmp_path / "run"
    p = start(long_run(data, out, "train.num_workers=2"))
    wait_training(p, out)
    workers = [int(c) for c in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()]
    assert len(workers) >= 2  # the loader workers, forked
    p.kill()
    p.wait(timeout=60)  # not communicate(): the workers hold its stdout too, it would wait for them to die
    assert any(Path(f"/proc/{w}").exists() for w in workers)  # they outlive it by a few seconds
    fd = os.open(out / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError while anyone holds it
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    p.communicate(timeout=60)
    r = subprocess.run([sys.executable, "-m", "beit", *map(str, long_run(data, out, "--resume", "--max-minutes",
                                                                         "0.001", "train.num_workers=2"))],
                       env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "in use by" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["status"] == "time_limit"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["tokenizer", "finetune"])
def test_sigkill_during_tokenizer_training_and_finetuning_then_resume(command):
    """scripts/sigkill_resume.py on the other training commands: killed twice (seed 13), resumed to the end,
    each step logged once, nothing left behind (the script's default also compares the losses with an
    uninterrupted run: it holds, measured for both commands with --kills 3 --steps 12)."""
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "sigkill_resume.py"), "--command", command,
                        "--kills", "2", "--steps", "8", "--seed", "13", "--no-reference"], env=ENV,
                       capture_output=True, text=True, timeout=600)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert p.returncode == 0 and result["ok"], result
