"""Run a ``beit`` command and SIGKILL the process right after optimiser step K (to test exact resume).

    python tests/kill_driver.py K pretrain --data ... --out RUN --steps 12 ...

The kill comes from a wrapper around the engine's ``after_step`` hook installed here, so no test hook lives
in library code. K = 0 runs the command normally.
"""

from __future__ import annotations

import os
import signal
import sys

import beit.engine as engine


def kill_after(method, kill_at: int) -> None:
    """Wrap ``method.after_step`` so the process SIGKILLs itself right after optimiser step ``kill_at``."""
    inner = getattr(method, "after_step", None)

    def after_step(step: int, total: int) -> None:
        if inner is not None:
            inner(step, total)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    method.after_step = after_step


def main() -> int:
    kill_at = int(sys.argv[1])
    real_train = engine.train

    def train(method, *args, **kwargs):
        kill_after(method, kill_at)
        return real_train(method, *args, **kwargs)

    engine.train = train  # before beit.tasks.* import it
    from beit.cli import main as cli_main

    return cli_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
