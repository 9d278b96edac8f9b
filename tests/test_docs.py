"""The README and docs/ against the product: what they name exists, and what exists is named."""

from __future__ import annotations

import argparse
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from shadowproxy.cli import build_parser
from shadowproxy.compare.config import Thresholds
from shadowproxy.config import Settings
from shadowproxy.metrics import Metrics, SnapshotCollector

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


def _table_keys(text: str, heading: str) -> list[str]:
    """The first column's `names` of the tables under ``heading`` up to the next heading of
    its level."""
    level = heading.split(" ", 1)[0]
    section = text.split(f"\n{heading}\n", 1)[1]
    section = re.split(rf"\n{level} ", section, maxsplit=1)[0]
    return re.findall(r"^\| `([^`]+)`", section, re.MULTILINE)


def test_every_metric_exported_is_documented_and_no_other() -> None:
    """docs/operations.md's metrics table names exactly the families /metrics serves."""
    metrics = Metrics()
    metrics.shadow("r", "s").finish(None, 1.0)
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lambda: [metrics.snapshot()]))
    served = {f"{m.name}_total" if m.type == "counter" else m.name
              for m in registry.collect()}
    documented = {name.split("{", 1)[0] for name in _table_keys(
        (ROOT / "docs" / "operations.md").read_text(), "## Metrics")}
    assert documented == served


def _config_keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every key a configuration file may hold, as docs/configuration.md writes them
    (``routes[].shadows[].name``, ``routes[].compare.features.NAME.path``)."""
    for name, field in model.model_fields.items():
        key = prefix + name
        yield key
        annotation = field.annotation
        union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        for member in typing.get_args(annotation) if union else (annotation,):
            origin = typing.get_origin(member)
            inner = typing.get_args(member)
            if origin is list and inner and isinstance(inner[0], type) \
                    and issubclass(inner[0], BaseModel):
                yield from _config_keys(inner[0], f"{key}[].")
            elif origin is dict and inner:
                for value in (inner[1], *typing.get_args(inner[1])):
                    if isinstance(value, type) and issubclass(value, BaseModel):
                        yield from _config_keys(value, f"{key}.NAME.")
            elif isinstance(member, type) and issubclass(member, BaseModel):
                yield from _config_keys(member, f"{key}.")


def test_every_configuration_key_is_in_the_reference_and_no_other() -> None:
    """docs/configuration.md lists every key the file takes (a block's keys standing for
    the block) and none that it refuses."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    rows: set[str] = set()
    inline: set[str] = set()
    for cell, meaning in re.findall(r"^\| (`[^|]+)\|[^|]*\|(.*)\|$", text, re.MULTILINE):
        for key in re.findall(r"`([^`.][^`]*)`", cell):  # `.max`: beside `...min`
            rows.add(key.replace(".TARGET", ".NAME"))  # a name of one's own: NAME, TARGET
            # A block's keys given in its row as `{a, b: default}`.
            for inner in re.findall(r"`\{([^}`]+)\}`", meaning):
                inline |= {f"{key}.{part.split(':')[0].strip()}".replace(".TARGET", ".NAME")
                           for part in inner.split(",")}
    # The thresholds' table names its keys without their prefix; a feature's `min` and
    # `max` (and the two tolerances) share a row.
    prefix = "routes[].compare.thresholds."
    rows = {prefix + k if prefix + k in _THRESHOLD_KEYS else k for k in rows}
    rows |= {k.removesuffix(".min") + ".max" for k in rows if k.endswith(".min")}
    keys = set(_config_keys(Settings))
    blocks = {k.rsplit(".", 1)[0].removesuffix("[]").removesuffix(".NAME") for k in keys
              if "." in k}
    assert sorted(keys - blocks - rows - inline) == []
    assert sorted(k for k in rows if "." in k or "[" in k or k in _TOP_LEVEL
                  if k not in keys and not k.endswith(".NAME")) == []


_THRESHOLD_KEYS = {f"routes[].compare.thresholds.{k}" for k in Thresholds.model_fields}
_TOP_LEVEL = set(Settings.model_fields)
