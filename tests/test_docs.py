"""The README and docs/ against the product: what they name exists, and what exists is named."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from shadowproxy.cli import build_parser

ROOT = Path(__file__).parent.parent
DOCS = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))])


def _commands(parser: argparse.ArgumentParser, name: str = "shadowproxy"
              ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from _commands(subparser, f"{name} {sub}")


def test_every_command_line_option_is_explained_and_documented() -> None:
    """`--help` of every command says what each option and argument is, and every long
    option is named in the README or docs/ (a short option's long form may be the one
    named there)."""
    unexplained, undocumented = [], []
    for name, parser in _commands(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                                   argparse._SubParsersAction)):
                continue
            if not action.help:
                unexplained.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
            if action.option_strings and not any(o in DOCS for o in action.option_strings):
                undocumented.append(f"{name} {action.option_strings[-1]}")
    assert unexplained == []
    assert undocumented == []
