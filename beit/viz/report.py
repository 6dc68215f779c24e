"""A single self-contained HTML report: tables, pictures and the commands that reproduce each step.

Everything is inline: pictures are embedded as base64 ``data:`` URIs, the style sheet sits in the page, and
there is no script and no external request, so the file can be mailed, attached to an issue or opened
offline and looks the same everywhere.

>>> from beit.viz.report import Figure, Section, Table, write_report
>>> sec = Section("Fine-tuning", tables=[Table(["init", "top-1"], [["BEiT", 0.81], ["scratch", 0.62]])],
...               figures=[Figure("run/loss.png", "training loss")],
...               commands=["beit finetune --train MY/train --val MY/val --init run/ --out ft/"])
>>> write_report("report.html", "beit demo", [sec])  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
         ".webp": "image/webp", ".svg": "image/svg+xml"}


@dataclass
class Table:
    """``columns`` and ``rows`` of cells (numbers are right-aligned and formatted, ``None`` shows a dash)."""

    columns: Sequence[str]
    rows: Sequence[Sequence[object]]
    caption: str = ""


@dataclass
class Figure:
    """A picture: a file path (PNG/JPEG/GIF/WebP/SVG) or PNG bytes, with a caption.

    ``pixelated`` scales small images up without blurring (masks, 32 px samples); ``width`` is the display
    width in CSS pixels (default: the image's own width, at most the column).
    """

    image: str | Path | bytes
    caption: str = ""
    pixelated: bool = False
    width: int | None = None


@dataclass
class Section:
    """One step of a pipeline: a short text, its numbers, its pictures and the commands that reproduce it."""

    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # small print: budgets, skipped pictures, warnings


def format_cell(value: object) -> tuple[str, bool]:
    """``(text, is_number)`` for one table cell."""
    if value is None:
        return "–", False
    if isinstance(value, bool):
        return ("yes" if value else "no"), False
    if isinstance(value, int):
        return f"{value:,}", True
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value), True
        if value == 0:
            return "0", True
        a = abs(value)
        if a >= 1000:
            return f"{value:,.0f}", True
        for bound, digits in ((100, 1), (10, 2), (1, 3), (1e-3, 4)):
            if a >= bound:
                return f"{value:.{digits}f}", True
        return f"{value:.2e}", True
    return str(value), False


def data_uri(image: str | Path | bytes) -> str:
    """A ``data:`` URI for a picture file or PNG bytes."""
    if isinstance(image, (bytes, bytearray)):
        mime, raw = "image/png", bytes(image)
    else:
        p = Path(image)
        mime = _MIME.get(p.suffix.lower())
        if mime is None:
            raise ValueError(f"{p}: not a picture type the report embeds ({', '.join(_MIME)})")
        raw = p.read_bytes()
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def _esc(s: object) -> str:
    return html.escape(str(s), quote=True)


def _text(s: str) -> str:
    """Paragraphs separated by blank lines; ``code`` in backticks; everything else escaped."""
    out = []
    for para in re.split(r"\n\s*\n", s.strip()):
        if not para.strip():
            continue
        body = re.sub(r"`([^`]+)`", r"<code>\1</code>", _esc(para.strip()))
        out.append(f"<p>{body}</p>")
    return "\n".join(out)


def _slug(s: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "section"
    slug, i = base, 2
    while slug in used:
        slug, i = f"{base}-{i}", i + 1
    used.add(slug)
    return slug


def render_table(t: Table) -> str:
    formatted = [[format_cell(v) for v in row] for row in t.rows]
    # a column whose cells are all numbers (or blanks) is right-aligned, its header too
    numeric = [any(r[j][1] for r in formatted if j < len(r))
               and all(r[j][1] or r[j][0] == "–" for r in formatted if j < len(r)) for j in range(len(t.columns))]
    head = "".join(f'<th class="num">{_esc(c)}</th>' if numeric[j] else f"<th>{_esc(c)}</th>"
                   for j, c in enumerate(t.columns))
    body = []
    for row in formatted:
        cells = []
        for text, num in row:
            cells.append(f'<td class="num">{_esc(text)}</td>' if num else f"<td>{_esc(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{_esc(t.caption)}</caption>" if t.caption else ""
    return f'<div class="table-wrap"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def render_figure(f: Figure) -> str:
    """``<figure>`` with the embedded picture; a missing file becomes a visible note, never a broken image."""
    try:
        src = data_uri(f.image)
    except (OSError, ValueError) as e:
        why = f"{Path(f.image).name} was not written" if isinstance(e, FileNotFoundError) else str(e)  # type: ignore[arg-type]
        return f'<figure class="missing"><div>picture not available: {_esc(why)}</div>' \
               f"<figcaption>{_esc(f.caption)}</figcaption></figure>"
    style = []
    if f.width:
        style.append(f"width:{int(f.width)}px")
    cls = ' class="pixelated"' if f.pixelated else ""
    st = f' style="{";".join(style)}"' if style else ""
    cap = f"<figcaption>{_esc(f.caption)}</figcaption>" if f.caption else ""
    return f'<figure><img{cls}{st} src="{src}" alt="{_esc(f.caption or "figure")}">{cap}</figure>'


def render_section(s: Section, anchor: str, number: int) -> str:
    parts = [f'<section id="{anchor}"><h2><span class="step">{number}</span>{_esc(s.title)}</h2>']
    if s.text:
        parts.append(_text(s.text))
    if s.tables:
        parts.append("".join(render_table(t) for t in s.tables))
    if s.figures:
        parts.append('<div class="figures">' + "".join(render_figure(f) for f in s.figures) + "</div>")
    if s.commands:
        cmds = "\n".join(_esc(c) for c in s.commands)
        parts.append(f'<div class="repro"><div class="repro-title">Reproduce on your own images</div>'
                     f"<pre><code>{cmds}</code></pre></div>")
    if s.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{_esc(n)}</li>" for n in s.notes) + "</ul>")
    parts.append("</section>")
    return "\n".join(parts)


_CSS = """
:root { --ink:#1d2330; --muted:#5d6576; --line:#e3e6ec; --bg:#f5f6f8; --card:#fff; --accent:#3b5bdb;
        --code:#0f1420; --codeink:#e6e9ef; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font: 15px/1.55 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background: linear-gradient(120deg, #1e2a52, #3b5bdb); color:#fff; padding: 34px 0 26px; }
.wrap { max-width: 1080px; margin: 0 auto; padding: 0 28px; }
header h1 { margin:0 0 6px; font-size: 28px; font-weight: 650; letter-spacing: -0.01em; }
header p { margin: 0; color: #d9e0ff; max-width: 820px; }
nav { margin-top: 16px; display:flex; flex-wrap:wrap; gap:6px; }
nav a { color:#fff; text-decoration:none; font-size:13px; padding: 3px 10px; border-radius: 999px;
        background: rgba(255,255,255,0.14); }
nav a:hover { background: rgba(255,255,255,0.28); }
main { padding: 22px 0 40px; }
section, .summary { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
          padding: 20px 24px; margin: 0 0 18px; box-shadow: 0 1px 2px rgba(16,24,40,0.04); }
h2 { margin: 0 0 10px; font-size: 19px; font-weight: 650; display:flex; align-items:center; gap:10px; }
.step { display:inline-flex; align-items:center; justify-content:center; width:26px; height:26px;
        border-radius: 50%; background: var(--accent); color:#fff; font-size: 13px; font-weight: 700; }
p { margin: 0 0 10px; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.9em;
       background: #eef1f6; padding: 1px 5px; border-radius: 4px; }
.table-wrap { overflow-x: auto; margin: 8px 0 14px; }
table { border-collapse: collapse; min-width: 50%; font-size: 14px; }
caption { text-align:left; color: var(--muted); font-size: 13px; padding-bottom: 6px; }
th, td { padding: 6px 14px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
th { font-weight: 600; color: var(--muted); font-size: 12.5px; text-transform: uppercase; letter-spacing: 0.03em;
     border-bottom: 2px solid var(--line); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:hover { background: #f8f9fc; }
.figures { display:flex; flex-wrap: wrap; gap: 18px; margin: 6px 0 12px; align-items: flex-start; }
figure { margin: 0; max-width: 100%; }
figure img { display:block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px;
             background: #fff; }
img.pixelated { image-rendering: pixelated; image-rendering: crisp-edges; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; max-width: 520px; }
figure.missing div { padding: 18px; border: 1px dashed #c7ccd6; border-radius: 6px; color: var(--muted); }
.repro { margin-top: 10px; }
.repro-title { font-size: 12.5px; font-weight: 600; color: var(--muted); text-transform: uppercase;
               letter-spacing: 0.03em; margin-bottom: 4px; }
pre { margin: 0; background: var(--code); color: var(--codeink); padding: 12px 14px; border-radius: 8px;
      overflow-x: auto; font-size: 13px; line-height: 1.5; }
pre code { background: none; padding: 0; color: inherit; }
ul.notes { margin: 10px 0 0; padding-left: 18px; color: var(--muted); font-size: 13px; }
footer { color: var(--muted); font-size: 12.5px; padding: 0 0 30px; }
footer p { margin: 0 0 4px; }
"""


def render_html(
    title: str,
    sections: Sequence[Section],
    *,
    subtitle: str = "",
    summary: Table | None = None,
    footer: Sequence[str] = (),
) -> str:
    """The whole page as a string (see the module docstring)."""
    used: set[str] = {"summary"}
    anchors = [_slug(s.title, used) for s in sections]
    nav = "".join(f'<a href="#{a}">{_esc(s.title)}</a>' for a, s in zip(anchors, sections))
    if summary is not None:
        nav = '<a href="#summary">Summary</a>' + nav
    body = []
    if summary is not None:
        body.append(f'<div class="summary" id="summary"><h2>Summary</h2>{render_table(summary)}</div>')
    body += [render_section(s, a, i + 1) for i, (s, a) in enumerate(zip(sections, anchors))]
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    foot = "".join(f"<p>{_esc(line)}</p>" for line in [*footer, f"Generated {stamp} by beit."])
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header><div class="wrap"><h1>{_esc(title)}</h1>{f"<p>{_esc(subtitle)}</p>" if subtitle else ""}
<nav>{nav}</nav></div></header>
<main><div class="wrap">
{chr(10).join(body)}
</div></main>
<footer><div class="wrap">{foot}</div></footer>
</body>
</html>
"""


def external_references(page: str) -> list[str]:
    """Every ``src``/``href``/``url()`` in ``page`` that would make the browser fetch something."""
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", page)
    refs += re.findall(r"""url\(\s*["']?([^"')]*)""", page)
    return [r for r in refs if not (r.startswith("data:") or r.startswith("#"))]


def write_report(path: str | Path, title: str, sections: Sequence[Section], **kwargs) -> Path:
    """Render and write the page (see :func:`render_html` for ``subtitle``, ``summary``, ``footer``)."""
    page = render_html(title, sections, **kwargs)
    bad = external_references(page)
    if bad:  # pragma: no cover - render_html only emits data: URIs and anchors
        raise ValueError(f"the report would fetch {bad[0]!r}: it must be self-contained")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


__all__ = ["Figure", "Section", "Table", "data_uri", "external_references", "format_cell", "render_html",
           "write_report"]
