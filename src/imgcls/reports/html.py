"""Self-contained HTML pages: sections of text, tables and figures, images embedded.

A page opens offline by double-click: every figure is an inline base64 PNG, and
the same PNGs are written beside the page so they can be used on their own.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from imgcls.io import write_atomic
from imgcls.plots import figure_png


@dataclass
class Section:
    """One part of a page: a title, paragraphs, tables (HTML strings) and named figures."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    figures: list[tuple[str, object]] = field(default_factory=list)  # (file stem, matplotlib Figure)


def table(header: list[str], rows: list[list], caption: str = "") -> str:
    """An HTML table; numbers are formatted, text is escaped."""
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        if isinstance(v, int):
            return f"{v:,}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #333}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}caption{text-align:left;font-weight:bold;padding:.3em 0}
img{max-width:100%;height:auto;display:block;margin:1em 0}nav a{margin-right:1em}pre{background:#f6f6f6;padding:1em;overflow-x:auto}
"""


def render_page(title: str, sections: list[Section], out_dir: Path, page_name: str = "report.html") -> Path:
    """Write ``out_dir/page_name`` and each figure as ``out_dir/<stem>.png``; returns the page path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1><nav>"]
    parts += [f"<a href='#s{i}'>{html.escape(s.title)}</a>" for i, s in enumerate(sections)]
    parts.append("</nav>")
    for i, s in enumerate(sections):
        parts.append(f"<section id='s{i}'><h2>{html.escape(s.title)}</h2>")
        parts += [f"<p>{p}</p>" for p in s.paragraphs]  # paragraphs may hold trusted inline HTML
        parts += s.tables
        for stem, fig in s.figures:
            png = figure_png(fig)
            write_atomic(out_dir / f"{stem}.png", png, fsync=False)  # rebuilt by `imgcls report`
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<img alt='{html.escape(stem)}' src='data:image/png;base64,{data}'>")
        parts.append("</section>")
    parts.append("</body></html>")
    return write_atomic(out_dir / page_name, "".join(parts), fsync=False)
