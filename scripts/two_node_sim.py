"""Two-node pretraining simulated on one machine: two ``torchrun`` agents (``--nnodes 2``, one process each,
gloo on CPU) meet through a c10d rendezvous on 127.0.0.1 and pretrain on tar shards, each node reading its
own share of every batch. Then the same run again, with node 1 killed (SIGKILL) after a checkpoint; the
job is ended (node 0 killed too, as a scheduler ends a job that lost a node), both nodes restart with
``--resume``, and the losses of every step must equal the uninterrupted run's.

    python scripts/two_node_sim.py --data 'shards/train-{000000..000004}.tar' --work /tmp/two_node --steps 9

Prints one JSON line (``ok``, the steps, the kill, seconds) and exits 0 when every loss matches. Only
loopback addresses are used. The same commands on two real hosts: docs/runs.md ("Two nodes").
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

TINY = ["model.embed_dim=48", "model.num_heads=3", "model.depth=2", "mae.decoder_dim=32", "mae.decoder_depth=1",
        "mae.decoder_heads=2", "train.log_every=1", "train.num_workers=1", "train.precision=fp32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(node: int, port: int, data: str, out: Path, steps: int, ckpt_every: int, batch: int,
           resume: bool) -> subprocess.Popen:
    """One node: a torchrun agent with one worker, in its own process group (so a kill takes both)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "beit-two-node",
           "--rdzv_conf", f"is_host={int(node == 0)}", "--local-addr", "127.0.0.1", "--max-restarts", "0",
           "-m", "beit", "-q", "pretrain", "--data", data, "--out", str(out), "--method", "mae",
           "--preset", "mae_tiny_patch4_32", "--steps", str(steps), "--batch-size", str(batch), "--device", "cpu",
           *(["--resume"] if resume else []), *TINY, f"train.ckpt_every={ckpt_every}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    log = open(out.parent / f"{out.name}.node{node}.log", "a")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    end = time.monotonic() + timeout
    return [p.wait(timeout=max(1.0, end - time.monotonic())) for p in procs]


def losses(run: Path) -> dict[int, float]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def run_pair(data: str, out: Path, steps: int, ckpt_every: int, batch: int, timeout: float,
             resume: bool = False, kill_after: int = 0) -> list[int]:
    """Both nodes; with ``kill_after`` K, SIGKILL node 1 once step K is logged, then end node 0 too."""
    port = free_port()
    procs = [launch(n, port, data, out, steps, ckpt_every, batch, resume) for n in (0, 1)]
    if not kill_after:
        return wait(procs, timeout)
    end = time.monotonic() + timeout
    while max(losses(out), default=0) < kill_after:
        if time.monotonic() > end or any(p.poll() is not None for p in procs):
            break
        time.sleep(0.02)
    for p in (procs[1], procs[0]):  # node 1 dies; the scheduler then ends the job on node 0
        kill_tree(p.pid)
    return wait(procs, 30)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (torchrun starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for q in tree:
        try:
            os.kill(q, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="tar shards (a pattern, list file or folder of .tar)")
    p.add_argument("--work", required=True, help="a new folder for the two runs and the node logs")
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--ckpt-every", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4, help="global batch (each node takes half)")
    p.add_argument("--kill-after", type=int, default=5, help="kill node 1 once this step is logged")
    p.add_argument("--timeout", type=float, default=300)
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    full, cut = work / "full", work / "cut"
    rc_full = run_pair(a.data, full, a.steps, a.ckpt_every, a.batch_size, a.timeout)
    rc_kill = run_pair(a.data, cut, a.steps, a.ckpt_every, a.batch_size, a.timeout, kill_after=a.kill_after)
    logged_before = max(losses(cut), default=0)  # after every process of the job is gone
    rc_resume = run_pair(a.data, cut, a.steps, a.ckpt_every, a.batch_size, a.timeout, resume=True)
    ref, got = losses(full), losses(cut)
    mismatched = [s for s in ref if got.get(s) != ref[s]]
    ok = (rc_full == [0, 0] and rc_resume == [0, 0] and sorted(ref) == list(range(1, a.steps + 1))
          and sorted(got) == sorted(ref) and not mismatched and a.kill_after <= logged_before < a.steps)
    print(json.dumps({"ok": ok, "steps": a.steps, "killed_after_step": logged_before, "rc_full": rc_full,
                      "rc_killed": rc_kill, "rc_resumed": rc_resume, "mismatched_steps": mismatched,
                      "seconds": round(time.monotonic() - t0, 1), "logs": str(work)}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
