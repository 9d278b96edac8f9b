"""The report for a terminal: rich tables, the verdict first (rendered from the JSON)."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

from shadowproxy.compare.tables import TextComparison, sections
from shadowproxy.compare.tables_generation import plain_diff, shorten
from shadowproxy.compare.visible import one_line

_STYLE = {"pass": "bold green", "warn": "bold yellow", "fail": "bold red"}


def _plain(text: str) -> Text:
    """``text`` shown as it is: rich reads a ``str`` cell or title as markup, so a recorded
    value such as ``[/b]`` stopped the report and ``[red]`` restyled it. Control characters
    and bidirectional overrides are shown as their escapes (``\\x1b``, ``\\u202e``), never
    sent to the terminal: rich passes them through; newlines as ``\\n``: a generated text
    printed as lines could fake the report's own lines below it (``one_line``)."""
    return Text(one_line(text))


def render_text(report: dict[str, Any], *, color: bool = False, width: int = 120) -> str:
    """The report as text; with ``color`` it carries ANSI styles for a terminal."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=color, no_color=not color,
                      highlight=False, emoji=False)
    status = report["verdict"]["status"]
    for section in sections(report):
        style = _STYLE.get(status, "bold") if section.key == "verdict" else "bold"
        console.rule(f"[{style}]{section.title}[/]", align="left")
        for note in section.notes:
            console.print(_plain(note))
        for table in section.tables:
            rich_table = RichTable(title=_plain(table.title) if table.title else None,
                                   title_justify="left",
                                   show_edge=False, header_style="bold")
            for i, header in enumerate(table.headers):
                rich_table.add_column(_plain(header), justify="left" if i == 0 else "right",
                                      overflow="fold")
            for row in table.rows:
                rich_table.add_row(*map(_plain, row))
            console.print(rich_table)
        for comparison in section.comparisons:
            _comparison(console, comparison)
        console.print()
    return buffer.getvalue()


def _comparison(console: Console, c: TextComparison) -> None:
    """Both texts side by side, then the word diff in wdiff's marks."""
    console.print(_plain(c.title), style="bold")
    table = RichTable(show_edge=False, header_style="bold", expand=True)
    table.add_column("primary", ratio=1, overflow="fold")
    table.add_column("shadow", ratio=1, overflow="fold")
    table.add_row(_shown(c.primary, c.primary_calls), _shown(c.shadow, c.shadow_calls))
    console.print(table)
    _diff_line(console, shorten(plain_diff(c.diff), 1200))


_DIFF = "diff: "


def _diff_line(console: Console, diff: str) -> None:
    """The diff after ``diff:``, wrapped to the console with its continuation lines
    indented under the diff's first word: wrapped at column 0, a long text padded with
    spaces put its own words at the start of a report line (``Verdict: PASS``)."""
    lines = _plain(diff).wrap(console, max(console.width - len(_DIFF), 20), overflow="fold")
    for i, line in enumerate(lines):
        console.print(Text(_DIFF if i == 0 else " " * len(_DIFF)) + line, overflow="fold",
                      crop=False)


def _shown(text: str, calls: list[str]) -> Text:
    """A side's text on one line, then each of its tool calls on a line of its own."""
    return Text("\n").join(_plain(line) for line in ([shorten(text)] if text else []) + calls)
