"""Run a ``beit`` command and SIGKILL the process at a chosen point (to test exact resume and crash safety).

    python -m tests.helpers.kill_driver WHEN pretrain --data ... --out RUN --steps 12 ...

``WHEN``: ``K`` or ``step:K`` kills right after optimiser step K; ``save:N`` kills in the middle of the Nth
checkpoint write (model.safetensors written, the rest not); ``line:N`` kills in the middle of the Nth line
of metrics.jsonl (half of it written). ``0`` runs the command normally. The kills come from wrappers
installed here, so no test hook lives in library code.
"""

from __future__ import annotations

import os
import signal
import sys

import beit.engine as engine


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after(method, kill_at: int) -> None:
    """Wrap ``method.after_step`` so the process SIGKILLs itself right after optimiser step ``kill_at``."""
    inner = getattr(method, "after_step", None)

    def after_step(step: int, total: int) -> None:
        if inner is not None:
            inner(step, total)
        if step == kill_at:
            _die()

    method.after_step = after_step


def kill_in_save(n: int) -> None:
    """SIGKILL during the ``n``-th checkpoint: after its first file, before the second."""
    import beit.checkpoint as ckpt

    real, calls = ckpt.save_file, [0]

    def save_file(tensors, path, *a, **k):
        calls[0] += 1
        if calls[0] == 2 * n:
            _die()
        return real(tensors, path, *a, **k)

    ckpt.save_file = save_file


def kill_in_line(n: int) -> None:
    """SIGKILL with half of the ``n``-th metrics line written."""
    real, calls = engine.MetricsWriter.write, [0]

    def write(self, row: dict) -> None:
        calls[0] += 1
        if calls[0] == n and self.enabled:
            import json

            with open(self.path, "a") as fh:
                line = json.dumps(row)
                fh.write(line[: len(line) // 2])
            _die()
        real(self, row)

    engine.MetricsWriter.write = write


def main() -> int:
    kind, _, value = sys.argv[1].rpartition(":")
    n = int(value)
    real_init = engine.Trainer.__init__
    if kind == "save":
        kill_in_save(n)
    elif kind == "line":
        kill_in_line(n)
    elif n:

        def init(self, method, *args, **kwargs):  # every command trains through one Trainer (beit.engine.run)
            kill_after(method, n)
            real_init(self, method, *args, **kwargs)

        engine.Trainer.__init__ = init
    from beit.cli import main as cli_main

    return cli_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
