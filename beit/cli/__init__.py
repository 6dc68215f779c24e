"""``beit`` command line: parse, build configs, call the library. No training logic lives here.

One module per command group, each with ``add_commands(subparsers)``, registered explicitly in
:data:`COMMAND_GROUPS` (the order of ``beit --help``); the helpers they share are public in
:mod:`.common`. User mistakes end with one line ``beit: error: ...`` and exit status 2.

Parsing imports no torch (``beit --help``, ``beit CMD --help``, ``beit presets``, ``beit --version`` answer at once):
a command module registers its flags from torch-free data (:mod:`beit.recipes`, :mod:`beit.config`) and imports
the library when its command runs. Every command ends with a short human summary, or with ``--json`` (added to
every command here) one JSON line instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from functools import partial
from types import ModuleType
from typing import Any

from ..version import __version__
from . import data, demo, embed, export, finetune, presets, pretrain, probe, segment, show, tokenizer
from .common import TRAIN_FLAGS, add_train_flags, one_line, overrides, print_result, user_errors, with_paths
from .runner import run_with

__all__ = ["COMMAND_GROUPS", "TRAIN_FLAGS", "add_train_flags", "build_parser", "main", "overrides",
           "print_result", "run_command", "user_errors", "with_paths"]

log = logging.getLogger("beit")

COMMAND_GROUPS = (pretrain, tokenizer, export, presets, finetune, probe, embed, segment, show, demo, data)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line ``beit: error: ...`` (exit status 2) like every other error."""

    def error(self, message: str):
        hint = f"see `{self.prog} --help`"
        if message.startswith("unrecognized arguments") and "=" in message:
            hint = "key=value overrides go together at the end, after every --flag"
        self.exit(2, f"beit: error: {message} ({hint})\n")


def build_parser(groups: Sequence[ModuleType] = COMMAND_GROUPS) -> argparse.ArgumentParser:
    """The ``beit`` parser with the commands of ``groups`` (modules with ``add_commands(subparsers)``)."""
    parser = Parser(
        prog="beit", description="BERT-style pretraining of vision transformers (BEiT, MAE, iBOT).")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")
    parser.add_argument("--version", action="version", version=f"beit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in groups:
        group.add_commands(sub)
    _add_json_flag(sub)
    # a command that runs other commands (``beit demo``) takes them through the parser it was parsed by:
    # handed down here, never imported back from this package
    parser.set_defaults(run_command=partial(run_with, parser))
    return parser


def run_command(argv: list[str], groups: Sequence[ModuleType] = COMMAND_GROUPS) -> Any:
    """``beit ARGV`` run in this process (:func:`.runner.run_with`); returns what it printed (JSON)."""
    return run_with(build_parser(groups), argv)


def _add_json_flag(sub: argparse._SubParsersAction) -> None:
    """``--json`` on every command (the leaves of the subcommand tree), whichever group added it."""
    for p in dict.fromkeys(sub.choices.values()):  # an alias maps to the same parser
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            for n in nested:
                _add_json_flag(n)
        elif "--json" not in p._option_string_actions:
            p.add_argument("--json", action="store_true",
                           help="print one machine-readable JSON line instead of the human summary")


def _load_extra_commands() -> None:
    """Kept for callers of the former plug-in loader; every command is registered in COMMAND_GROUPS."""


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parse_args``, except that ``key=value`` overrides may also come between or after the ``--flags``:
    argparse hands the positional ``overrides`` list out at the first positional chunk (right after
    ``beit probe knn``), so any later ``key=value`` would be "unrecognized"."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None, groups: Sequence[ModuleType] = COMMAND_GROUPS) -> int:
    """Run one command. Exit status: 0 done, 2 a user error (one line), 128 + N after signal N: 130 for
    Ctrl-C (SIGINT), 143 for SIGTERM, whether the run saved and stopped (first signal) or stopped at once
    (a second Ctrl-C), so ``beit pretrain ... && beit finetune ...`` never goes on from a partial run."""
    parser = build_parser(groups)
    args = parse(parser, argv)
    rank = int(os.environ.get("RANK", "0"))
    level = logging.WARNING if (args.quiet or rank != 0) else logging.INFO
    logging.basicConfig(level=level, format="%(message)s")
    _take_stop_signal()  # a signal an earlier command of this process received is not this one's
    _forget_starts()  # and the run folders it claimed are not this one's to clean up
    try:
        code = int(args.func(args) or 0)
    except BrokenPipeError:  # `beit presets | head`: the reader left; not an error (and no second one at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except user_errors() as e:
        _abandon_failed_starts()
        if args.debug:
            raise
        print(f"beit: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _abandon_failed_starts()
        if args.debug:
            raise
        print("beit: interrupted: stopped at once, without saving (the run keeps its last checkpoint)", file=sys.stderr)
        return 128 + signal.SIGINT
    _forget_starts()
    received = _take_stop_signal()
    return 128 + received if received and code == 0 else code


# The run-folder and signal state lives in beit.runs and beit.engine, which only a command that trains loads
# (parsing, --help and `beit presets` never import torch): where a module is not loaded it holds no state.
def _loaded(name: str) -> ModuleType | None:
    return sys.modules.get(f"beit.{name}")


def _take_stop_signal() -> int | None:
    engine = _loaded("engine")
    return engine.take_stop_signal() if engine is not None else None


def _forget_starts() -> None:
    if (runs := _loaded("runs")) is not None:
        runs.forget_starts()


def _abandon_failed_starts() -> None:
    if (runs := _loaded("runs")) is not None:
        runs.abandon_failed_starts()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
