"""The README and docs/ against the product: what they name exists, and what exists is named."""

from __future__ import annotations

import argparse
import re
import textwrap
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import yaml
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from shadowproxy.cli import build_parser
from shadowproxy.compare.config import CompareConfig, Thresholds
from shadowproxy.config import Settings, Shadow, StorageConfig, load_config
from shadowproxy.errors import ConfigError
from shadowproxy.failures import ERROR_KINDS
from shadowproxy.metrics import RECORD_OUTCOMES, Metrics, SnapshotCollector
from shadowproxy.recorder.bodies import WITHHELD_REASONS
from shadowproxy.recorder.postgres import REFUSED
from shadowproxy.recorder.rows import UNEXPECTED
from shadowproxy.reload import RESTART_ONLY
from shadowproxy.store.database import PERMANENT, TRANSIENT, connection
from shadowproxy.store.maintenance import run_once
from tests.conftest import StartProxy, route
from tests.upstreams import model, serve

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


def test_every_time_option_says_which_zone_a_time_without_one_is_in() -> None:
    """`--from T` and `--to T` of the report and of replay read a time without zone as UTC
    (``compare.command.resolve_window``, shared), and the `--help` of each says so, as
    docs/report.md and docs/replay.md do: replay's said nothing of it, nor the report's
    `--to`, so a user of a laptop in another zone had to guess."""
    unsaid = [f"{name} {action.option_strings[-1]}"
              for name, parser in _commands(build_parser())
              for action in parser._actions
              if action.metavar == "T" and "a time without zone is UTC" not in (action.help or "")]
    assert unsaid == []
    for doc in ("report.md", "replay.md"):
        assert "a time without zone is UTC" in (ROOT / "docs" / doc).read_text(), doc


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


def test_every_label_value_a_metric_takes_is_documented() -> None:
    """The metrics table names each value of the labels whose values the proxy chooses:
    the shadow outcomes, what became of a record, why a body was withheld."""
    rows = {row.split("{", 1)[0]: row for row in re.findall(
        r"^\| `(shadowproxy_[^|]*\|.*)$", (ROOT / "docs" / "operations.md").read_text(),
        re.MULTILINE)}
    words = {
        "shadowproxy_shadow_requests_total": ("ok", *ERROR_KINDS),
        "shadowproxy_records_total": RECORD_OUTCOMES,
        "shadowproxy_bodies_withheld_total": (*WITHHELD_REASONS, REFUSED, UNEXPECTED),
        "shadowproxy_database_error": (TRANSIENT, PERMANENT),
    }
    missing = [f"{metric} {word}" for metric, values in words.items() for word in values
               if f"`{word}`" not in rows[metric] and f"\\|{word}" not in rows[metric]
               and f"{word}\\|" not in rows[metric]]
    assert missing == []


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


def _field(key: str) -> FieldInfo:
    """The model field of a key as docs/configuration.md writes it."""
    model: type[BaseModel] | None = Settings
    field = None
    for part in key.replace("[]", "").split("."):
        if part in ("NAME", "TARGET"):
            continue
        assert model is not None, key
        field = model.model_fields[part]
        model = None
        for member in (field.annotation, *typing.get_args(field.annotation)):
            for inner in (member, *typing.get_args(member)):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    model = inner
    assert field is not None
    return field


def test_every_documented_default_is_the_default() -> None:
    """The default column of docs/configuration.md says what a file that leaves a key out
    gets: a value written as YAML (`1.5`, `[]`, `null`), a list of names, or a word
    (`all`, `inferred`, `—`) for a key with no value of its own."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    wrong = []
    for cell, default in re.findall(r"^\| (`[^|]+)\| ([^|]*)\|", text, re.MULTILINE):
        keys = [k for k in re.findall(r"`([^`]+)`", cell) if not k.startswith(".")]
        literals = re.findall(r"`([^`]+)`", default)
        for i, key in enumerate(keys):
            full = key if key in _TOP_LEVEL or "." in key else (
                "routes[].compare.thresholds." + key)
            field = _field(full)
            value = field.get_default(call_default_factory=True)
            if isinstance(value, BaseModel | Path):
                value = str(value) if isinstance(value, Path) else None
            if literals:
                documented = yaml.safe_load(literals[min(i, len(literals) - 1)])
            elif "," in default:
                documented = [w.strip() for w in default.split(",")]
            else:  # a word: the key has no value of its own, or one found at run time
                documented = value if value in (None, [], {}, PydanticUndefined) else default
            if documented != value:
                wrong.append(f"{full}: documented {default.strip()}, default {value!r}")
    assert wrong == []


def test_every_setting_is_said_to_change_live_or_to_need_a_restart() -> None:
    """docs/operations.md's restart table names every setting a reload keeps
    (reload.RESTART_ONLY), and its "Live" list names every other key of the file (a block
    such as `limits` standing for its keys; a route's or shadow's `name` and `match` as
    routes and shadows "added, removed")."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("### What changes live, and what needs a restart\n", 1)[1]
    live, restart = section.split("\n### ", 1)[0].split("**A restart**", 1)
    table = set(re.findall(r"^\| (.*?) \|", restart, re.MULTILINE)) - {"setting"}
    named = {k for row in table for k in re.findall(r"`([^`]+)`", row)}
    pinned = {".".join(path) for path in RESTART_ONLY}
    assert sorted(k for k in pinned if k not in named and k.split(".")[-1] not in named
                  and not (k.startswith("recording.queue_") and "recording.queue_*" in named)
                  ) == []
    words = set(re.findall(r"`([a-z_]+)`", live))
    keys = list(_config_keys(Settings))
    blocks = {k.rsplit(".", 1)[0].removesuffix("[]") for k in keys if "." in k}
    unnamed = []
    for key in keys:
        if key in blocks or key.startswith("routes[].compare.") or any(
                key == p or key.startswith(p + ".") for p in pinned):
            continue
        leaf = key.rsplit(".", 1)[-1].removesuffix("[]")
        if leaf not in words and key.split(".", 1)[0] not in words and leaf != "name" \
                and not key.startswith("routes[].match."):  # `limits`: the whole block
            unnamed.append(key)
    assert "`match`" in live
    assert unnamed == []


_THRESHOLD_KEYS = {f"routes[].compare.thresholds.{k}" for k in Thresholds.model_fields}
_TOP_LEVEL = set(Settings.model_fields)


# --- the YAML examples of the README and docs/, loaded as the proxy loads a file ----------

_A_ROUTE = 'routes:\n  - name: r\n    primary: {url: "http://127.0.0.1:9001"}\n'
_A_SHADOW = _A_ROUTE + '    shadows:\n      - name: s\n        url: "http://127.0.0.1:9002"\n'


def _documented_yaml() -> list[tuple[str, str]]:
    """Every ```yaml block of the README and docs/, as (where, text); a block that shows
    alternatives (a top-level comment after some keys starts the next one) as one text
    each."""
    found = []
    for path in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))]:
        text = path.read_text()
        for block in re.finditer(r"```yaml\n(.*?)```", text, re.DOTALL):
            line = text.count("\n", 0, block.start()) + 2
            parts = [""]
            for row in block.group(1).splitlines(keepends=True):
                if row.startswith("#") and parts[-1].strip("\n").rsplit("\n", 1)[-1][:1] \
                        not in ("", "#"):
                    parts.append("")
                parts[-1] += row
            found += [(f"{path.name}:{line}", part) for part in parts]
    return found


def _as_a_file(text: str) -> str:
    """A documented block as a whole configuration file: a file as it is; a route's
    ``compare`` block, or its content, under a route; a shadow's keys under a shadow."""
    keys = set(yaml.safe_load(text))
    if "routes" in keys:
        return text
    if keys == {"compare"}:
        return _A_ROUTE + textwrap.indent(text, "    ")
    if keys <= set(Shadow.model_fields):
        return _A_SHADOW + textwrap.indent(text, "        ")
    assert keys <= set(CompareConfig.model_fields), f"a block of unknown keys: {keys}"
    return _A_ROUTE + "    compare:\n" + textwrap.indent(text, "      ")


def test_every_yaml_example_in_the_docs_loads(tmp_path: Path) -> None:
    """Each ```yaml block of the README and docs/ is a file, or a block of one, that
    `shadowproxy check-config` accepts: a key renamed or a value tightened in the code
    makes this fail, not the operator who copies the example."""
    examples = _documented_yaml()
    assert len(examples) >= 6
    refused = []
    for i, (where, text) in enumerate(examples):
        path = tmp_path / f"{i}.yaml"
        path.write_text(_as_a_file(text))
        try:
            load_config(path)
        except ConfigError as exc:
            refused.append(f"{where}: {exc}")
    assert refused == []


def test_the_thresholds_the_docs_call_the_defaults_are_the_defaults() -> None:
    """docs/report.md's and docs/generative.md's `thresholds:` blocks say they give the
    defaults: each value is the one a file that leaves the key out gets."""
    wrong = []
    for where, text in _documented_yaml():
        block = yaml.safe_load(text)
        thresholds = (block.get("compare") or {}).get("thresholds")
        if thresholds is None:
            continue
        assert re.search(r"thresholds:.*defaults", text), where
        wrong += [f"{where}: {key}: {value}, default {Thresholds.model_fields[key].default}"
                  for key, value in thresholds.items()
                  if Thresholds.model_fields[key].default != value]
    assert wrong == []


# --- the SQL in the README and docs/, run against records the proxy wrote ------------------

def _documented_sql() -> list[tuple[str, str]]:
    """Every statement of the ```sql blocks of the README and docs/ (but the Citus DDL, a
    design only), and every `psql ... -c '...'` one-liner, as (where, statement)."""
    found = []
    for path in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))]:
        text = path.read_text()
        for block in re.finditer(r"```sql\n(.*?)```", text, re.DOTALL):
            if "citus" in block.group(1):
                continue
            line = text.count("\n", 0, block.start()) + 2
            for statement in _statements(block.group(1)):
                code = [s for s in statement.splitlines() if not s.lstrip().startswith("--")]
                if "".join(code).strip():
                    found.append((f"{path.name}:{line}", statement.strip().rstrip(";")))
        for one_liner in re.finditer(r"psql [^\n]*-c '([^']+)'", text):
            found.append((f"{path.name}:{text.count(chr(10), 0, one_liner.start()) + 1}",
                          one_liner.group(1)))
    return found


def _statements(block: str) -> list[str]:
    """A block's statements: split where a line ends with ``;`` outside a ``$$`` body."""
    out, current = [], ""
    for line in block.splitlines(keepends=True):
        current += line
        if line.rstrip().endswith(";") and current.count("$$") % 2 == 0:
            out.append(current)
            current = ""
    return [*out, current]


def _result(statements: dict[str, list[Any]], title: str) -> list[Any]:
    """The rows of the documented statement whose leading comment is ``-- title``."""
    matches = [rows for sql, rows in statements.items() if sql.startswith(f"-- {title}")]
    assert matches, f"no documented query titled {title!r}"
    return matches[0]


async def test_every_documented_query_runs_and_says_what_its_text_says(
        start_proxy: StartProxy, database_url: str) -> None:
    """Each SQL example of the README and docs/ runs on a database the proxy recorded into
    (some requests of two hours ago, summarized, some of now), and those whose text says
    what they return return it."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow:
        routes = [route(primary.url, shadow.url, name="diabetes")]
        routes[0]["shadows"][0]["name"] = "candidate"
        async with start_proxy(routes) as proxy, aiohttp.ClientSession() as http:
            for i in range(6):
                headers = {"X-Request-Id": "the-x-request-id" if i == 0 else f"r{i}"}
                resp = await http.post(f"http://127.0.0.1:{proxy.port}/predict",
                                       json={"features": {"bmi": 20 + i}}, headers=headers)
                assert resp.status == 200
    async with connection(database_url) as conn:
        # Half of them two hours back, in hours the maintenance summarizes.
        for table, key in (("requests", "id"), ("responses", "request")):
            await conn.execute(
                f"UPDATE shadowproxy.{table} SET received_at = received_at - interval '2h' "
                f"WHERE {key} IN (SELECT id FROM shadowproxy.requests "
                "WHERE request_id IN ('the-x-request-id', 'r1', 'r2'))")
    outcome = await run_once(database_url, StorageConfig())
    assert outcome.rolled is not None and outcome.rolled.requests == 3

    statements: dict[str, list[Any]] = {}
    failed = []
    async with connection(database_url) as conn:
        for where, sql in _documented_sql():
            try:
                async with conn.transaction():
                    statements[sql] = await conn.fetch(sql)
            except asyncpg.PostgresError as exc:
                failed.append(f"{where}: {exc}\n{sql}")
        first = await conn.fetchval("SELECT min(received_at) FROM shadowproxy.requests")
    assert failed == []
    assert len(statements) >= 15

    assert [tuple(r) for r in _result(statements, "Rows waiting in DEFAULT")] == [(0, 0)]
    answers = _result(statements, "A request as it was sent, and every answer to it")
    assert sorted(r["target"] for r in answers) == ["candidate", "primary"]
    # The request itself, not only its answers.
    assert {(r["method"], r["path"], r["request_body_json"]) for r in answers} == {
        ("POST", "/predict", '{"features": {"bmi": 20}}')}
    per_shadow = _result(statements, "Agreement and shadow tail latency per route and shadow")
    assert [(r["route"], r["shadow_name"]) for r in per_shadow] == [("diabetes", "candidate")]
    assert [tuple(r) for r in _result(statements, "Shadow outcomes by kind")] == [
        ("candidate", "ok", 6)]
    assert sum(r["requests"] for r in _result(
        statements, "Requests per day and route, from the summaries")) == 3
    # Hours before the first record are not hours waiting to be summarized.
    waiting = [r["hour"] for r in _result(statements, "Hours not summarized yet")]
    assert waiting == sorted(waiting)
    assert all(hour >= first.replace(minute=0, second=0, microsecond=0) for hour in waiting)
