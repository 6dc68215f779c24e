"""SIGTERM / Ctrl-C during a run: save after the current step, then stop; the signal is kept for the CLI's exit
status (128 + N)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger("beit")

_received: list[int] = []  # the stop signals train() received in this process (the CLI's exit status)


def take_stop_signal() -> int | None:
    """The signal that stopped the last interrupted :func:`train` of this process (SIGINT, SIGTERM), or None;
    forgotten once read. The CLI exits with 128 + it after the run saved (130 for Ctrl-C, 143 for SIGTERM)."""
    sig = _received[-1] if _received else None
    _received.clear()
    return sig


class StopFlag:
    """SIGTERM / Ctrl-C ask the loop to save and stop after the current step; a second Ctrl-C stops at once
    (KeyboardInterrupt, which the CLI turns into one line and exit status 130)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signal = signum
        _received.append(signum)
        log.warning("received %s: saving a checkpoint after this step, then stopping",
                    signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

