"""Running a ``beit`` command line in this process: parse it with the real parser, call the function the CLI
calls, return what it printed. The demo runs every step this way (``beit demo`` hands it the runner, so the
demo never imports the command line it is a command of), and so do benchmarks (``bench/compile_cost.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
from typing import Any

__all__ = ["run_with"]


def run_with(parser: argparse.ArgumentParser, argv: list[str]) -> Any:
    """Parse ``beit ARGV`` with ``parser`` and run it in this process; returns what it printed last as JSON
    (None if it printed none). A command line the parser refuses, or a non-zero exit, raises RuntimeError."""
    try:
        args = parser.parse_args([*argv, "--json"])  # the machine-readable line instead of the human summary
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
