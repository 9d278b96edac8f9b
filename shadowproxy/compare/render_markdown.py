"""The report as Markdown (GitHub-flavoured tables), rendered from the JSON."""

from __future__ import annotations

import html
import re
from typing import Any

from shadowproxy.compare.tables import Table, TextComparison, sections
from shadowproxy.compare.tables_generation import shorten


def _cell(text: str) -> str:
    """``text`` on one line of a table row: Markdown ends a line at CR as at LF, so a
    recorded value with a CR split its row in two. Escaped as HTML, as the diff is: Markdown
    passes tags through, so a recorded ``<script>`` or ``<img onerror=...>`` would reach
    the page a Markdown viewer renders."""
    return html.escape(re.sub("\r\n?|\n", " ", text), quote=False).replace("|", "\\|")


def _table(table: Table) -> list[str]:
    lines = [f"*{table.title}*", ""] if table.title else []
    lines.append("| " + " | ".join(_cell(h) or " " for h in table.headers) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:"
                                for i in range(len(table.headers))) + "|")
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    return lines + [""]


def _comparison(c: TextComparison) -> list[str]:
    """Both texts side by side, then the diff with GitHub's ``<del>``/``<ins>`` tags."""
    diff = []
    for op, a, b in c.diff:
        if op == "equal":
            diff.append(html.escape(a))
            continue
        if a:
            diff.append(f"<del>{html.escape(a)}</del>")
        if b:
            diff.append(f"<ins>{html.escape(b)}</ins>")
    return [f"**{_cell(c.title)}**", "", "| primary | shadow |", "|---|---|",
            f"| {_cell(shorten(c.primary))} | {_cell(shorten(c.shadow))} |", "",
            "diff: " + re.sub("\r\n?|\n", "<br>", "".join(diff)), ""]


def render_markdown(report: dict[str, Any]) -> str:
    """A Markdown document: a heading per section, notes as paragraphs, tables."""
    meta = report["meta"]
    lines = [f"# shadowproxy report: {meta['route']} / {meta['shadow']}", ""]
    for section in sections(report):
        lines += [f"## {section.title}", ""]
        for note in section.notes:
            lines += [_cell(note), ""]
        for table in section.tables:
            lines += _table(table)
        for comparison in section.comparisons:
            lines += _comparison(comparison)
    lines.append(f"_generated {meta['generated_at']} by shadowproxy "
                 f"{meta['versions']['shadowproxy']}_")
    return "\n".join(lines) + "\n"
