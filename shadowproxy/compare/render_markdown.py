"""The report as Markdown (GitHub-flavoured tables), rendered from the JSON."""

from __future__ import annotations

import html
import re
from typing import Any

from shadowproxy.compare.tables import Table, TextComparison, sections
from shadowproxy.compare.tables_generation import shorten
from shadowproxy.compare.visible import visible


def _cell(text: str) -> str:
    """``text`` on one line of a table row: Markdown ends a line at CR as at LF, so a
    recorded value with a CR split its row in two."""
    return _inline(text, " ")


# What Markdown reads as syntax inside a line: a backslash (``a\\|b`` would end the cell at
# the pipe), code spans, emphasis, strikethrough, and the brackets of links and images.
_SYNTAX = re.compile(r"([\\`*_~\[\]|])")

# What GitHub makes a link or a notification in plain text: a URL (``https://``, ``ftp://``)
# or ``www.`` (autolinks), ``@name`` (a mention, which notifies that user; an email
# address), ``#123`` and ``GH-123`` (references to issues, which back-link from them). A
# backslash escape does not stop them all: GitHub finds mentions and references in the
# rendered text, where ``\@name`` is ``@name`` again. A ``<wbr>`` (an invisible word-break
# opportunity) after the ``@``, ``#``, ``:`` or before the ``.`` or ``-`` splits the text
# there, so that neither the autolinker nor those filters read one token.
_LINKING = re.compile(r"(?<=:)(?=//)|(?<=@)(?=[0-9A-Za-z])|(?<=#)(?=[0-9])"
                      r"|(?<=\bwww)(?=\.)|(?<=\bGH)(?=-[0-9])", re.IGNORECASE)


def _inline(text: str, newline: str) -> str:
    """``text`` shown as it is, its line breaks written as ``newline``. Escaped as HTML, as
    the diff is: Markdown passes tags through, so a recorded ``<script>`` or ``<img
    onerror=...>`` would reach the page a Markdown viewer renders. Its Markdown syntax is
    escaped: a recorded ``![x](https://...)`` was an image the viewer loaded from that host
    when the report was opened, ``[x](https://...)`` a link. Control characters and
    bidirectional overrides are shown as escapes (``visible``): printed to a terminal
    (``--format markdown`` without ``-o``), they acted on it. URLs, ``www.``, ``@name`` and
    ``#123`` are broken by a ``<wbr>`` (``_LINKING``): a report pasted into an issue linked
    out, notified the users a shadow named and back-linked from the issues it numbered."""
    return newline.join(
        _LINKING.sub("<wbr>", _SYNTAX.sub(r"\\\1", html.escape(visible(line), quote=False)))
        for line in re.split("\r\n?|\n", text))


def _table(table: Table) -> list[str]:
    lines = [f"*{_cell(table.title)}*", ""] if table.title else []
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
            diff.append(_inline(a, "<br>"))
            continue
        if a:
            diff.append(f"<del>{_inline(a, '<br>')}</del>")
        if b:
            diff.append(f"<ins>{_inline(b, '<br>')}</ins>")
    return [f"**{_cell(c.title)}**", "", "| primary | shadow |", "|---|---|",
            f"| {_cell(shorten(c.shown('primary')))} | {_cell(shorten(c.shown('shadow')))} |", "",
            "diff: " + "".join(diff), ""]


def render_markdown(report: dict[str, Any]) -> str:
    """A Markdown document: a heading per section, notes as paragraphs, tables."""
    meta = report["meta"]
    lines = [f"# shadowproxy report: {_cell(meta['route'])} / {_cell(meta['shadow'])}", ""]
    for section in sections(report):
        lines += [f"## {_cell(section.title)}", ""]
        for note in section.notes:
            lines += [_cell(note), ""]
        for table in section.tables:
            lines += _table(table)
        for comparison in section.comparisons:
            lines += _comparison(comparison)
    lines.append(f"_generated {meta['generated_at']} by shadowproxy "
                 f"{meta['versions']['shadowproxy']}_")
    return "\n".join(lines) + "\n"
