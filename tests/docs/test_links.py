"""The docs hold together: every relative link in README.md and docs/**/*.md reaches an existing file (and,
with a ``#anchor``, an existing heading there); the results page stays a short page whose every section links
the notebook entry its numbers come from and gives a command that the CLI accepts; the README's results
tables quote only numbers that the results page shows, one per cell; and code comments that point into the
docs name files that exist, not the old numbered sections of a single results page."""

import re
import shlex
from pathlib import Path

import pytest

from beit.cli import build_parser
from tests.helpers.paths import ROOT

DOCS = ROOT / "docs"
RESULTS = DOCS / "results.md"
NOTEBOOK = DOCS / "notebook"
MARKDOWN = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?(?:e-?\d+)?")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (links in code are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text())) if not re.match(r"[a-z]+:", t)]


def test_slug_matches_github():
    assert slug("9. Semantic segmentation on CamVid (issue 14)") == "9-semantic-segmentation-on-camvid-issue-14"
    assert slug("The default demo: `beit demo`, 10 minutes on 2 cores") == \
        "the-default-demo-beit-demo-10-minutes-on-2-cores"
    assert slug("8.1 The issue's budget on the 2-core CPU (2026-11-27)") == \
        "81-the-issues-budget-on-the-2-core-cpu-2026-11-27"


def test_the_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](#top) [bad](missing.md) `[code](ignored.md)`\n\n```\n[x](nope.md)\n```\n")
    assert relative_links(page) == ["#top", "missing.md"]
    assert anchors(page) == {"top"}


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_results_page_is_short_and_each_claim_links_its_entry_and_its_command():
    text = RESULTS.read_text()
    assert len(text.splitlines()) <= 250, "docs/results.md is a page read in two minutes: move detail to the notebook"
    claims = {k: v for k, v in sections(text).items() if k != "Notebook"}
    assert {"Learning pays", "Speed on a CPU", "Interop exactness", "The GPU check"} <= set(claims)
    parts = {}
    for name, body in claims.items():
        subs = re.split(r"^### (.+)$", body, flags=re.M)
        parts.update(dict(zip(subs[1::2], subs[2::2], strict=True)) if len(subs) > 1 else {name: body})
    assert len(parts) >= 6
    for title, body in parts.items():
        assert "```bash" in body, f"{title}: no command that reproduces it"
        if title != "Interop exactness":  # its figures are the tolerances the tests assert, not a dated run
            assert "](notebook/" in body, f"{title}: no link to the notebook entry its numbers come from"


def test_every_notebook_entry_is_listed_on_the_results_page_and_in_the_index():
    results, index = RESULTS.read_text(), (NOTEBOOK / "README.md").read_text()
    entries = [p.name for p in NOTEBOOK.glob("*.md") if p.name != "README.md"]
    assert len(entries) >= 9
    for name in entries:
        assert f"(notebook/{name}" in results, f"docs/results.md does not link notebook/{name}"
        assert f"({name})" in index, f"docs/notebook/README.md does not list {name}"


def results_commands() -> list[list[str]]:
    out = []
    for block in re.findall(r"```bash\n(.*?)```", RESULTS.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words.pop(0)
            if words:
                out.append(words)
    return out


def test_results_page_commands_parse_and_name_existing_files():
    commands = results_commands()
    beit = [w for w in commands if w[0] == "beit"]
    assert len(beit) >= 8
    parser = build_parser()
    for words in beit:
        parser.parse_args(words[1:])  # an unknown flag exits: the page must not invent one
    for words in commands:
        for w in words:
            if re.match(r"(scripts|bench)/", w):
                assert (ROOT / w).is_file(), f"docs/results.md names {w}, which does not exist"


def readme_results_tables() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Results\n"):text.index("\n## ", text.index("## Results\n") + 1)]
    rows = []
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_readme_results_quote_the_results_page_one_number_per_cell():
    rows = readme_results_tables()
    headers = [r for r in rows if r[0] == "result"]
    assert len(headers) >= 2
    page = RESULTS.read_text()
    quoted = 0
    for row in rows:
        if row[0] == "result":
            header = row
            continue
        first_value = header.index("pretrained") if "pretrained" in header else header.index("ours")
        assert "docs/results.md#" in row[0], f"README results row without a link to its results section: {row[0]}"
        for cell in row[first_value:]:
            if cell == "-":
                continue
            assert NUMBER.fullmatch(cell), f"README results cell is not one number: {cell!r}"
            assert re.search(rf"(?<![\d.,]){re.escape(cell)}(?![\d,]|\.\d)", page), \
                f"README quotes {cell}, which docs/results.md does not show"
            quoted += 1
    assert quoted >= 12


def test_code_points_into_docs_by_file_not_by_old_section_number():
    stale, missing = [], []
    for path in [*ROOT.glob("beit/**/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("scripts/*")]:
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if re.search(r"results\.md,? (section|§|\d)|docs section \d", text):
            stale.append(str(rel))
        for ref in re.findall(r"docs/[\w./*-]+\.md", text):
            if not list(ROOT.glob(ref)):
                missing.append(f"{rel}: {ref}")
    assert not stale, f"old results.md section numbers (the page is split; name the notebook file): {stale}"
    assert not missing, f"references to docs that do not exist: {missing}"
