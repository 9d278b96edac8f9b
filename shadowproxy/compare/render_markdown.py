"""The report as Markdown (GitHub-flavoured tables), rendered from the JSON."""

from __future__ import annotations

from typing import Any

from shadowproxy.compare.tables import Table, sections


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(table: Table) -> list[str]:
    lines = [f"*{table.title}*", ""] if table.title else []
    lines.append("| " + " | ".join(_cell(h) or " " for h in table.headers) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:"
                                for i in range(len(table.headers))) + "|")
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    return lines + [""]


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
    lines.append(f"_generated {meta['generated_at']} by shadowproxy "
                 f"{meta['versions']['shadowproxy']}_")
    return "\n".join(lines) + "\n"
