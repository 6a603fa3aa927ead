"""HTML pieces of the report: escaping, tables, embedded figures and the page shell.

The page is one self-contained file: inline CSS, every image a ``data:image/png;base64``
URI, no script and no external address, so it opens anywhere, offline, without Python.
All text from files passes through :func:`html.escape`.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Iterable, List, Sequence, Tuple

from .figures import Plot

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       max-width: 1180px; margin: 2em auto; padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #d0d0d0; padding-bottom: 0.2em; margin-top: 2.2em; }
h3 { margin-top: 1.6em; }
code, .mono { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.92em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d0d0; padding: 0.25em 0.7em; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e4e4e4; }
figcaption { font-size: 0.88em; color: #555; }
.note { background: #fff7e0; border-left: 4px solid #e0b000; padding: 0.4em 0.8em; margin: 1em 0; }
.note ul { margin: 0.3em 0 0.1em; }
.meta { color: #555; }
nav.contents ul { display: flex; flex-wrap: wrap; gap: 0.2em 1.2em; padding-left: 0; list-style: none;
                   margin: 0.4em 0 0; font-size: 0.92em; }
.to-top { font-size: 0.85em; margin: 1.2em 0 0; }
.table-box { max-width: 100%; overflow-x: auto; margin: 0.8em 0; }
.table-box table { margin: 0; }
th, td { overflow-wrap: anywhere; }
.verdict { background: #f0f6ff; border: 1px solid #b8d0f0; padding: 0.2em 1.2em 0.8em; margin-top: 1.2em; }
.verdict h2 { margin-top: 0.6em; }
.verdict .answer { font-size: 1.08em; }
.note.failed { background: #fdecea; border-left-color: #c0392b; }
img { max-width: 100%; }
"""


@dataclass(frozen=True)
class Section:
    """One part of the page.

    Attributes:
        anchor: its ``id`` (letters, digits, ``-``).
        title: its heading, plain text.
        body: its HTML, headings of sub-parts included.
        plots: the figures it embeds, for writing them to ``figures/`` as well.
    """

    anchor: str
    title: str
    body: str
    plots: List[Plot] = field(default_factory=list)


def esc(text: object) -> str:
    """Text for HTML content or attribute values."""
    return html.escape(str(text), quote=True)


def para(text: str, raw: bool = False) -> str:
    """A paragraph of plain text (HTML when ``raw``)."""
    return f"<p>{text if raw else esc(text)}</p>\n"


def note(text: str) -> str:
    """A highlighted remark (plain text)."""
    return f'<p class="note">{esc(text)}</p>\n'


def notes(lead: str, items: Sequence[str]) -> str:
    """A highlighted remark made of several notes (plain text): ``lead`` then a list."""
    entries = "".join(f"<li>{esc(item)}</li>" for item in items)
    return f'<div class="note">{esc(lead)}<ul>{entries}</ul></div>\n'


def table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric_from: int = 1) -> str:
    """An HTML table of plain-text cells; columns from ``numeric_from`` are right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{esc(c)}</td>' if i >= numeric_from else f"<td>{esc(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return (f'<div class="table-box"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            "</table></div>\n")


def key_values(pairs: Sequence[Tuple[str, str]]) -> str:
    """A two-column table of quantity and value (both left-aligned)."""
    return table(("quantity", "value"), pairs, numeric_from=2)


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,…`` of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure(plot: Plot) -> str:
    """An embedded image with its alt text and caption."""
    caption = f"<figcaption>{esc(plot.caption)}</figcaption>" if plot.caption else ""
    return f'<figure><img src="{data_uri(plot.png)}" alt="{esc(plot.alt)}">{caption}</figure>\n'


TOP = "top"
TO_TOP = f'<p class="to-top"><a href="#{TOP}">↑ Back to the top</a></p>\n'


def contents(entries: Sequence[Tuple[str, str]]) -> str:
    """The list of links at the top of the page: ``(anchor, title)`` of each part."""
    items = "".join(f'<li><a href="#{esc(a)}">{esc(t)}</a></li>' for a, t in entries)
    return f'<nav class="contents" aria-label="Contents"><ul>{items}</ul></nav>\n'


def page(title: str, head: str, sections: Sequence[Section], head_parts: Sequence[Tuple[str, str]] = ()) -> str:
    """The whole document: title, contents (``head_parts``, the ``(anchor, title)`` of
    the parts of ``head``, then every section), the header block ``head`` (HTML) and the
    sections in order, each ending with a link back to the top."""
    nav = contents(list(head_parts) + [(s.anchor, s.title) for s in sections])
    parts = [f'<section id="{esc(s.anchor)}">\n<h2>{esc(s.title)}</h2>\n{s.body}{TO_TOP}</section>\n'
             for s in sections]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{esc(title)}</title>\n"
        f"<style>{CSS}</style>\n</head>\n<body>\n<header id=\"{TOP}\">\n<h1>{esc(title)}</h1>\n{nav}</header>\n"
        f"{head}<main>\n{''.join(parts)}</main>\n</body>\n</html>\n"
    )
