"""The command-line reference ``docs/cli.md``, generated from the argparse parser so it cannot drift.

    python -m beit.docs_cli            # rewrite docs/cli.md
    python -m beit.docs_cli --check    # exit 1 if docs/cli.md differs from the parser (CI, tests)

The text is built from the parser's actions (flags, metavars, choices, defaults, help), not from argparse's
``--help`` output, whose layout depends on the terminal width and the Python version.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "docs" / "cli.md"

HEADER = """# Command-line reference

Generated from the parser by `python -m beit.docs_cli`; do not edit by hand (`tests/docs/test_cli_docs.py`
fails when this file and the parser disagree). Every training command also takes `key=value` config
overrides after its flags (for example `optim.lr=1e-3 model.drop_path_rate=0.2`); `--help` on any command
prints the same information.
"""


def _md(s: object) -> str:
    """Text for a Markdown table cell."""
    return " ".join(str(s).split()).replace("|", "\\|")


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if text == argparse.SUPPRESS:
        return ""
    if "%(" in text:
        params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
        if params.get("choices") is not None:
            params["choices"] = ", ".join(map(str, params["choices"]))
        text = text % {**params, "prog": prog}
    return text


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.metavar is None and action.choices is not None:
        return "{" + ",".join(map(str, action.choices)) + "}"
    meta = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    if isinstance(meta, tuple):
        meta = " ".join(meta)
    if action.nargs in ("*", "+"):
        return f"{meta} ..."
    if action.nargs == "?":
        return f"[{meta}]"
    return str(meta)


def _default(action: argparse.Action) -> str:
    if action.required and (action.option_strings or action.nargs not in ("*", "?")):
        return "required"
    d = action.default
    if d is None or d is argparse.SUPPRESS or action.nargs == 0 or d == [] or d is False:
        return ""
    return f"`{d}`"


def _synopsis(prog: str, parser: argparse.ArgumentParser) -> str:
    parts = [prog]
    optional = False
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if a.option_strings:
            if a.required:
                parts.append(f"{a.option_strings[-1]} {_value(a)}".strip())
            else:
                optional = True
        elif a.nargs in ("*", "?"):
            parts.append(f"[{_value(a).removeprefix('[').removesuffix(']')}]")
        else:
            parts.append(_value(a))
    if optional:
        parts.insert(1 + sum(1 for a in parser._actions if a.option_strings and a.required), "[options]")
    return " ".join(parts)


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """``(name, one-line help, parser)`` of each sub-command, in the order they were added."""
    out = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: (c.help or "") for c in a._choices_actions}
            seen: set[int] = set()
            for name, sub in a.choices.items():
                if id(sub) in seen:  # aliases
                    continue
                seen.add(id(sub))
                out.append((name, helps.get(name, ""), sub))
    return out


def _command(prog: str, summary: str, parser: argparse.ArgumentParser, level: int) -> list[str]:
    lines = [f"{'#' * level} `{prog}`", ""]
    if summary:
        lines += [summary[0].upper() + summary[1:] + ("" if summary.endswith(".") else "."), ""]
    if parser.description and parser.description != summary:
        lines += [" ".join(parser.description.split()), ""]
    subs = _subparsers(parser)
    if not subs:
        lines += ["```", _synopsis(prog, parser), "```", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
                   and a.help != argparse.SUPPRESS]
        if not actions:
            continue
        title = group.title or "options"
        if title in ("optional arguments", "options"):
            title = "options"
        lines += [f"*{title}*", "", "| argument | value | default | description |", "|---|---|---|---|"]
        for a in actions:
            names = ", ".join(f"`{s}`" for s in a.option_strings) if a.option_strings else f"`{a.dest}`"
            value = _value(a)
            lines.append(f"| {names} | {_md(f'`{value}`') if value else ''} | {_md(_default(a))} "
                         f"| {_md(_help(a, prog))} |")
        lines.append("")
    for name, helptext, sub in subs:
        lines += _command(f"{prog} {name}", helptext, sub, min(level + 1, 4))
    return lines


def generate(parser: argparse.ArgumentParser | None = None) -> str:
    """The Markdown reference for ``parser`` (default: the ``beit`` parser with every command loaded)."""
    if parser is None:
        from .cli import build_parser

        parser = build_parser()
    lines = [HEADER, "## Commands", ""]
    subs = _subparsers(parser)
    for name, helptext, _ in subs:
        lines.append(f"- [`beit {name}`](#beit-{name}): {helptext}")
    lines.append("")
    top = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    if top:
        lines += ["Global options (before the command):", ""]
        lines += [f"- `{', '.join(a.option_strings)}`: {_help(a, 'beit')}" for a in top]
        lines.append("")
    for name, helptext, sub in subs:
        lines += _command(f"beit {name}", helptext, sub, 2)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m beit.docs_cli", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_PATH), help="where the reference lives (default: docs/cli.md)")
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if the file is out of date")
    args = ap.parse_args(argv)
    text, path = generate(), Path(args.out)
    if args.check:
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            print(f"{path} is out of date: run `python -m beit.docs_cli`", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
