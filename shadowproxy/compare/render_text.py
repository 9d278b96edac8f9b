"""The report for a terminal: rich tables, the verdict first (rendered from the JSON)."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console
from rich.table import Table as RichTable

from shadowproxy.compare.tables import sections

_STYLE = {"pass": "bold green", "warn": "bold yellow", "fail": "bold red"}


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
            console.print(note, markup=False)
        for table in section.tables:
            rich_table = RichTable(title=table.title or None, title_justify="left",
                                   show_edge=False, header_style="bold")
            for i, header in enumerate(table.headers):
                rich_table.add_column(header, justify="left" if i == 0 else "right",
                                      overflow="fold")
            for row in table.rows:
                rich_table.add_row(*row)
            console.print(rich_table)
        console.print()
    return buffer.getvalue()
