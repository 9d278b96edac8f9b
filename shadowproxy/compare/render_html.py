"""The report as one self-contained HTML file: tables plus inline SVG plots, no external
resources (no scripts, fonts or stylesheets to fetch), rendered from the JSON."""

from __future__ import annotations

import html
import json
from typing import Any

from shadowproxy.compare.generation import DiffSegment, diff_html
from shadowproxy.compare.plots import report_plots
from shadowproxy.compare.tables import Table, TextComparison, sections
from shadowproxy.compare.visible import visible

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1150px;color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;
margin-top:2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.85rem}
th,td{padding:.25rem .6rem;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f6f6f6}
caption{text-align:left;font-style:italic;padding:.3rem 0}
.verdict{display:inline-block;padding:.2rem .7rem;border-radius:4px;color:#fff;
font-weight:bold}.pass{background:#2e7d32}.warn{background:#ed6c02}.fail{background:#c62828}
.plots{display:flex;flex-wrap:wrap;gap:1rem}.plots svg{max-width:100%;height:auto}
details{margin-top:2rem}pre{font-size:.75rem;overflow:auto;background:#f6f6f6;padding:1rem}
.pair{width:100%;table-layout:fixed}.pair td{text-align:left;vertical-align:top;
white-space:pre-wrap;word-wrap:break-word}.pair th{text-align:left}
del{background:#fbe9e7;color:#b71c1c}ins{background:#e8f5e9;color:#1b5e20;text-decoration:none}
"""


def _text(text: str) -> str:
    """``text`` as HTML text: its tags escaped, and its control characters and
    bidirectional overrides shown as escapes (``visible``), as the text report shows them.
    Raw, they reached the terminal of whoever printed the page (``--format html`` without
    ``-o``, ``cat``, ``less -R``)."""
    return html.escape(visible(text))


def _table(table: Table) -> str:
    head = "".join(f"<th>{_text(h)}</th>" for h in table.headers)
    body = "".join("<tr>" + "".join(f"<td>{_text(c)}</td>" for c in row) + "</tr>"
                   for row in table.rows)
    caption = f"<caption>{_text(table.title)}</caption>" if table.title else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _comparison(c: TextComparison) -> str:
    """Both texts in two columns, and the word diff across both below them."""
    diff = diff_html([DiffSegment(op, a, b) for op, a, b in c.diff])
    return (f'<table class="pair"><caption>{_text(c.title)}</caption><thead><tr>'
            "<th>primary</th><th>shadow</th></tr></thead><tbody><tr>"
            f"<td>{_text(c.shown('primary'))}</td><td>{_text(c.shown('shadow'))}</td></tr>"
            f'<tr><td colspan="2">{diff}</td></tr></tbody></table>')


def render_html(report: dict[str, Any]) -> str:
    """The whole HTML document, with the JSON itself embedded at the end for reference."""
    meta = report["meta"]
    status = report["verdict"]["status"]
    plots = report_plots(report)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>shadowproxy report: {_text(meta['route'])} / "
        f"{_text(meta['shadow'])}</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>shadowproxy report: {_text(meta['route'])} / "
        f"{_text(meta['shadow'])} <span class=\"verdict {status}\">"
        f"{status.upper()}</span></h1>",
    ]
    for section in sections(report):
        parts.append(f'<section id="{section.key}"><h2>{_text(section.title)}</h2>')
        parts += [f"<p>{_text(note)}</p>" for note in section.notes]
        parts += [_table(t) for t in section.tables]
        parts += [_comparison(c) for c in section.comparisons]
        if plots.get(section.key):
            parts.append('<div class="plots">' + "".join(plots[section.key]) + "</div>")
        parts.append("</section>")
    data = html.escape(json.dumps(report, indent=1, allow_nan=False))
    parts.append(f"<details><summary>The report as JSON</summary><pre>{data}</pre></details>")
    parts.append(f"<p><small>generated {html.escape(meta['generated_at'])} by shadowproxy "
                 f"{html.escape(meta['versions']['shadowproxy'])}</small></p></body></html>")
    return "\n".join(parts) + "\n"
