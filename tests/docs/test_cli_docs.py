"""docs/cli.md is generated from the parser (``python -m beit.docs_cli``): it must match it exactly."""

from __future__ import annotations

import argparse

from beit import docs_cli
from tests.helpers.paths import ROOT

DOC = ROOT / "docs" / "cli.md"


def test_cli_reference_matches_parser():
    expected = docs_cli.generate()
    assert DOC.is_file(), "docs/cli.md is missing: run `python -m beit.docs_cli`"
    assert DOC.read_text(encoding="utf-8") == expected, (
        "docs/cli.md is out of date with the parser: run `python -m beit.docs_cli` and commit the result")


def test_reference_lists_every_command_and_flag():
    from beit import cli

    cli._load_extra_commands()
    parser = cli.build_parser()
    text = docs_cli.generate(parser)

    def walk(p: argparse.ArgumentParser, prog: str):
        for name, _, sub in docs_cli._subparsers(p):
            assert f"`{prog} {name}`" in text
            for a in sub._actions:
                for flag in a.option_strings:
                    if flag not in ("-h", "--help"):
                        assert f"`{flag}`" in text, f"{prog} {name} {flag} missing from the reference"
            walk(sub, f"{prog} {name}")

    walk(parser, "beit")


def test_generator_renders_a_small_parser(tmp_path):
    p = argparse.ArgumentParser(prog="x")
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("go", help="go somewhere", description="Go | far.")
    s.add_argument("--to", required=True, help="where")
    s.add_argument("--speed", type=float, default=1.5, help="how fast (default %(default)s)")
    s.add_argument("--mode", choices=["a", "b"])
    s.add_argument("--dry", action="store_true")
    s.add_argument("rest", nargs="*", metavar="key=value")
    text = docs_cli.generate(p)
    assert "## `beit go`" in text and "Go somewhere." in text and "Go \\| far." not in text
    assert "| `--to` | `TO` | required | where |" in text
    assert "| `--speed` | `SPEED` | `1.5` | how fast (default 1.5) |" in text
    assert "`{a,b}`" in text and "| `--dry` |  |  |" in text
    assert "beit go --to TO [options] [key=value ...]" in text


def test_check_mode(tmp_path, capsys):
    out = tmp_path / "cli.md"
    assert docs_cli.main(["--out", str(out), "--check"]) == 1
    assert docs_cli.main(["--out", str(out)]) == 0
    assert docs_cli.main(["--out", str(out), "--check"]) == 0
