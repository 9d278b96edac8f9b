"""``shadowproxy labels import``: load ``request_id,label`` rows into ``shadowproxy.labels``.

The import is an upsert, so running it twice changes nothing and a corrected file replaces
earlier labels. A label is stored as JSON: ``1``, ``0.5``, ``true`` and ``[1, 0, 1]`` (a batch
request, one label per prediction) keep their JSON type; anything else is a string. Ids that
match no recorded request are stored anyway (their records may still be in the proxy's spool)
and reported, with examples, so that a file with the wrong ids is noticed at once.

A file is refused as a whole (exit status 2, nothing imported), with the line of each
problem, when a label is ``NaN`` or ``Infinity`` (JSON has no such numbers), when an id or a
label holds a character PostgreSQL cannot store (a NUL, or half of a surrogate pair written
as a JSON escape), when one id is given two different labels (compared as JSON values,
as jsonb does: ``1`` and ``1.0`` are one label), or when a request of a route
with ``compare.task: regression`` gets a label that is not a number, or a number past a
float's range such as ``1e400`` (the report could not use it).

A file that writes one yes/no class more than one way (``1`` and ``true``, ``true`` and
``True``) is imported with a warning: the report reads them as one class only for models
that answer true/false or 0/1, and a mix often means exports put together that disagree.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import asyncpg

from shadowproxy.errors import DatabaseError, UsageError
from shadowproxy.jsonexact import NotFiniteNumber, TooDeep, loads_exact
from shadowproxy.store.database import reason

if TYPE_CHECKING:
    import _csv


@dataclass
class LabelImport:
    """What an import did."""

    rows: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped_empty: int = 0
    duplicates_in_file: int = 0
    unknown_ids: int = 0
    unknown_examples: list[str] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)
    """The file line of each request id's first label."""
    spellings: dict[str, dict[str, int]] = field(default_factory=dict)
    """Of the classes true and false: each way the file writes it (``1``, ``true``,
    ``True``) and the line it is first written so on (``binary_class``)."""

    def mixed_spellings(self) -> str | None:
        """What to say of a file that writes one yes/no class more than one way, else None."""
        mixed = [f"{c} as " + ", ".join(f"{w} (line {n})" for w, n in ways.items())
                 for c, ways in sorted(self.spellings.items(), reverse=True) if len(ways) > 1]
        if not mixed:
            return None
        return ("one class is written more than one way: " + "; ".join(mixed) + ". The "
                "report reads them as one class for a model that answers true/false or "
                "0/1, but not for one that answers other values; if the file was put "
                "together from several exports, check that they label the same way")


_SHOWN = 10


class _Unstorable(ValueError):
    pass


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
"""What PostgreSQL's text and jsonb refuse: NUL, and a lone surrogate. In a JSON label
either can only come from an escape (``\\u0000``, ``\\ud800``): JSON refuses a raw control
character, and UTF-8 text cannot hold a surrogate."""


def _storable(value: object) -> bool:
    """Whether every string of a parsed JSON value (keys too) is one PostgreSQL can hold
    (walked without recursion: a label may nest as deep as the parser allows)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _UNSTORABLE.search(v) is not None:
                return False
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
    return True


def _label_json(text: str) -> str:
    """The label as JSON text: JSON values are kept, anything else becomes a JSON string.
    ``NotFiniteNumber`` for NaN and Infinity, which PostgreSQL's jsonb (like JSON) has no
    room for, ``TooDeep`` for a value nested too deeply to read, and ``_Unstorable`` for
    what its text cannot hold: checked here, so that the file's line is named, not a
    database error for the whole import."""
    try:
        value = loads_exact(text, allow_nan=False)[0]
    except (NotFiniteNumber, TooDeep):
        raise
    except ValueError:
        if "\x00" in text:
            raise _Unstorable(text) from None
        return json.dumps(text)
    if "\\u" in text and not _storable(value):
        raise _Unstorable(text)
    return text


_BINARY = {"0": ("false", "0"), "1": ("true", "1"), "0.0": ("false", "0"),
           "1.0": ("true", "1")}


def binary_class(label: str) -> tuple[str, str] | None:
    """(``true`` or ``false``, how it is written) if the label (as in the file) is a
    spelling of a yes/no class: ``1``, ``true``, ``True``, ``TRUE``, which the report reads
    as one class when the models answer true/false or 0/1 (``1`` and ``1.0`` are written
    one way: they are one JSON value). Else None."""
    if len(label) > 5:
        return None
    lower = label.lower()
    return (lower, label) if lower in ("true", "false") else _BINARY.get(label)


def _same_label(a: str, b: str) -> bool:
    """Whether two labels are one JSON value, as jsonb compares them (the upsert's "unchanged"):
    numbers by value (``1`` and ``1.0``, read as decimals so that no two differ only past a
    float's digits), objects whatever the order of their keys, spacing ignored; ``true`` is
    not ``1``. Only called for an id given twice, so the second read costs nothing else."""
    if a == b:
        return True
    try:
        pairs = [(json.loads(a, parse_float=Decimal, parse_int=Decimal),
                  json.loads(b, parse_float=Decimal, parse_int=Decimal))]
    except (ValueError, RecursionError):
        return False  # a string label kept as written (not JSON) differs in its text
    while pairs:  # walked without recursion: a label may nest as deep as the parser allows
        x, y = pairs.pop()
        if type(x) is not type(y):
            return False
        if isinstance(x, list):
            if len(x) != len(y):
                return False
            pairs.extend(zip(x, y, strict=True))
        elif isinstance(x, dict):
            if x.keys() != y.keys():
                return False
            pairs.extend((x[k], y[k]) for k in x)
        elif x != y:
            return False
    return True


def _problems(path: Path, found: list[str]) -> UsageError:
    shown = found[:_SHOWN]
    more = f"\n... and {len(found) - _SHOWN} more" if len(found) > _SHOWN else ""
    return UsageError(f"{path}: nothing was imported:\n" + "\n".join(shown) + more)


_FIELD_LIMIT = 16 << 20
"""The longest field read, 16 MiB: past any answer the proxy records (bodies are cut at
``recording.max_body_bytes``, 1 MiB by default). The csv module's own default, 128 KiB, is
shorter than a long reference answer of a generation route; a field is built in memory
several times its size, so the limit is not PostgreSQL's 1 GiB."""


def _not_utf8(path: Path, exc: UnicodeDecodeError, *, piped: bool) -> UsageError:
    """Where a file that is not UTF-8 first goes wrong, read again line by line: the error's
    own position counts from the start of the chunk being decoded, not of the file, so it
    named no line (a character never spans a line end, so each line decodes alone).
    Standard input cannot be read again: its message names the byte, not the line."""
    if piped:
        return UsageError(
            f"{path}: nothing was imported: the byte 0x{exc.object[exc.start:exc.start + 1].hex()}"
            " is not UTF-8; convert the input from its encoding, e.g. Latin-1: "
            "... | iconv -f LATIN1 -t UTF-8 | shadowproxy labels import -c FILE -")
    name = shlex.quote(str(path))
    try:
        with path.open("rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if number == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                    return UsageError(
                        f"{path}: nothing was imported: the file is UTF-16 (Excel's "
                        "\"Unicode Text\"), not UTF-8; save it as \"CSV UTF-8\", or "
                        f"convert it: iconv -f UTF-16 -t UTF-8 {name} > labels-utf8.csv")
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as bad:
                    byte = raw[bad.start:bad.start + 1].hex()
                    return UsageError(
                        f"{path}:{number}: nothing was imported: the byte 0x{byte} at "
                        f"character {len(raw[:bad.start].decode('utf-8', 'replace')) + 1} "
                        "is not UTF-8; save the file as \"CSV UTF-8\", or convert it from "
                        "its encoding, e.g. Latin-1: "
                        f"iconv -f LATIN1 -t UTF-8 {name} > labels-utf8.csv")
    except OSError:
        pass
    return UsageError(f"{path}: nothing was imported: not a UTF-8 CSV file ({exc})")


STDIN = Path("<stdin>")
"""The name of standard input (the file ``-``) in messages."""


@contextmanager
def _text(path: Path) -> Iterator[TextIO]:
    """The labels file as text (a byte-order mark dropped), or standard input for STDIN,
    left open for the process: only the wrapper made here is taken off it."""
    if path != STDIN:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            yield fh
        return
    fh = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", newline="")
    try:
        yield fh
    finally:
        fh.detach()


def read_labels(path: Path) -> tuple[dict[str, str], LabelImport]:
    """Read the CSV (``STDIN``: standard input) into {request_id: label JSON}; UsageError says
    what is wrong with it."""
    result = LabelImport()
    labels: dict[str, str] = {}
    reader: _csv.Reader | None = None
    default_limit = csv.field_size_limit(_FIELD_LIMIT)
    try:
        with _text(path) as fh:
            # csv.reader, not DictReader: a row's line is the line it starts on, which only
            # the line count before it gives (a quoted label may span many lines, and
            # DictReader skips blank lines unseen).
            reader = rows = csv.reader(fh)
            header: list[str] | None = []
            while header == []:  # blank lines before the header
                header = next(rows, None)
            header = header or []
            columns = {c.strip().lower(): i for i, c in enumerate(header)}
            if "request_id" not in columns or "label" not in columns:
                # Excel writes ';' where the decimal comma is the locale's, and tabs as text
                sep = next((c for c in ";\t|" if len(header) == 1 and {"request_id", "label"}
                            <= {n.strip().lower() for n in header[0].split(c)}), None)
                raise UsageError(
                    f"{path}: expected a header row with the columns request_id,label "
                    f"(found {header or 'no header'})" + (
                        f"; the file is separated by {sep!r}, not commas: save it as "
                        "comma-separated CSV" if sep else ""))
            id_col, label_col = columns["request_id"], columns["label"]
            found: list[str] = []
            end = rows.line_num
            for fields in rows:
                line, end = end + 1, rows.line_num
                if not fields:
                    continue  # a blank line
                result.rows += 1
                request_id = fields[id_col].strip() if id_col < len(fields) else ""
                label = fields[label_col].strip() if label_col < len(fields) else ""
                if not request_id or not label:
                    result.skipped_empty += 1
                    continue
                if "\x00" in request_id:
                    found.append(f"{path}:{line}: the request id {request_id!r} holds a NUL "
                                 "character, which PostgreSQL cannot store (no request has "
                                 "such an id); correct or remove the row")
                    continue
                try:
                    value = _label_json(label)
                except NotFiniteNumber:
                    found.append(f"{path}:{line}: the label {label!r} of {request_id!r} is "
                                 "not a finite number (JSON has no NaN or Infinity); "
                                 "correct it, or leave it empty to skip the row")
                    continue
                except TooDeep:
                    found.append(f"{path}:{line}: the label of {request_id!r} is nested too "
                                 "deeply to read (about a thousand levels at most); correct "
                                 "it, or leave it empty to skip the row")
                    continue
                except _Unstorable:
                    found.append(f"{path}:{line}: the label {label!r} of {request_id!r} "
                                 "holds a NUL character or half of a surrogate pair "
                                 "(\\u0000, \\ud800), which PostgreSQL cannot store; "
                                 "remove it, or leave the label empty to skip the row")
                    continue
                if request_id in labels:
                    if not _same_label(labels[request_id], value):
                        found.append(f"{path}:{line}: request id {request_id!r} has the label "
                                     f"{label!r} here and {labels[request_id]} on line "
                                     f"{result.lines[request_id]}; keep one of the two rows")
                        continue
                    result.duplicates_in_file += 1
                else:
                    result.lines[request_id] = line
                labels[request_id] = value
                yes_no = binary_class(label)
                if yes_no is not None:
                    result.spellings.setdefault(yes_no[0], {}).setdefault(yes_no[1], line)
            if found:
                raise _problems(path, found)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the labels file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc, piped=path == STDIN) from exc
    except csv.Error as exc:
        # The line being read (where the reader stopped), not the row's first.
        where = f"{path}:{reader.line_num}" if reader is not None else str(path)
        raise UsageError(f"{where}: cannot be read as CSV ({exc}); a field is read up to "
                         f"{_FIELD_LIMIT:,} characters") from exc
    finally:
        csv.field_size_limit(default_limit)
    return labels, result


_FLOAT_OVERFLOW = 2**1024 - 2**970
"""The least number a float8 (a Python float) reads as infinity: past the largest float by
half its last step, rounded up (the largest float's mantissa is odd)."""
_NOT_NUMBERS = f"""
    SELECT DISTINCT request_id, label, route, numbers FROM (
      SELECT i.request_id, i.label, q.route, l,
             jsonb_typeof(l) = 'number' OR (jsonb_typeof(l) = 'array' AND NOT
                 jsonb_path_exists(l, '$[*] ? (@.type() != "number")')) AS numbers
      FROM _labels_in i CROSS JOIN LATERAL (SELECT i.label::jsonb) AS j(l)
      JOIN shadowproxy.requests q ON q.request_id = i.request_id
      WHERE q.route = ANY($1::text[])) x
    WHERE NOT numbers
       OR jsonb_path_exists(l, '$[*] ? (@ >= {_FLOAT_OVERFLOW} || @ <= -{_FLOAT_OVERFLOW})')
    ORDER BY request_id LIMIT $2"""
"""The labels of regression routes the report cannot use: not numbers, or numbers past a
float's range (``1e400``: jsonb holds it, the report reads it as infinity and left the row
out of its metrics, saying nothing). ``numbers``: the label is (an array of) numbers."""


async def import_labels(conn: asyncpg.Connection, labels: dict[str, str],
                        result: LabelImport, *, regression_routes: Sequence[str] = (),
                        path: Path = Path("labels")) -> LabelImport:
    """Upsert ``labels`` in one transaction and count what changed; UsageError (and nothing
    imported) when a request of one of ``regression_routes`` gets a label that is not a
    number, or one past a float's range."""
    try:
        async with conn.transaction():
            await conn.execute("CREATE TEMP TABLE _labels_in (request_id text, label text) "
                               "ON COMMIT DROP")
            await conn.copy_records_to_table("_labels_in", records=list(labels.items()))
            if regression_routes:
                wrong = await conn.fetch(_NOT_NUMBERS, list(regression_routes), _SHOWN + 1)
                if wrong:
                    raise _problems(path, [
                        f"{path}:{result.lines.get(r['request_id'], '?')}: the label "
                        f"{r['label']} of {r['request_id']!r} " + (
                            "is beyond the range of a float (±1.8e308)" if r["numbers"]
                            else "is not a number") + f", but route {r['route']!r} has "
                        "compare.task: regression (the report could not use it)"
                        for r in wrong])
            rows = await conn.fetch("""
                INSERT INTO shadowproxy.labels AS l (request_id, label)
                SELECT request_id, label::jsonb FROM _labels_in
                ON CONFLICT (request_id) DO UPDATE
                  SET label = EXCLUDED.label, imported_at = now()
                  WHERE l.label IS DISTINCT FROM EXCLUDED.label
                RETURNING (xmax = 0) AS inserted""")
            unknown = await conn.fetch("""
                SELECT i.request_id, count(*) OVER () AS n FROM _labels_in i
                WHERE NOT EXISTS (SELECT 1 FROM shadowproxy.requests q
                                  WHERE q.request_id = i.request_id)
                ORDER BY i.request_id LIMIT 5""")
    except asyncpg.UndefinedTableError as exc:
        raise DatabaseError(f"{exc}; run `shadowproxy migrate -c FILE` first") from exc
    except asyncpg.PostgresError as exc:
        raise DatabaseError(f"importing labels failed: {reason(exc)}") from exc
    result.inserted = sum(1 for r in rows if r["inserted"])
    result.updated = len(rows) - result.inserted
    result.unchanged = len(labels) - len(rows)
    result.unknown_ids = int(unknown[0]["n"]) if unknown else 0
    result.unknown_examples = [r["request_id"] for r in unknown]
    return result


def run_labels_import(args: argparse.Namespace) -> int:
    """The CLI command: read the file, upsert, print a summary; 0 on success."""
    from shadowproxy.config import load_config
    from shadowproxy.runner import run_command
    from shadowproxy.store.database import connection, database_url

    settings = load_config(args.config)
    path = STDIN if args.file == "-" else Path(args.file)
    labels, result = read_labels(path)
    url = database_url(settings)
    regression = [r.name for r in settings.routes
                  if r.compare is not None and r.compare.task == "regression"]

    async def go() -> LabelImport:
        async with connection(url) as conn:
            return await import_labels(conn, labels, result, regression_routes=regression,
                                       path=path)

    result = run_command(go(), interrupted=(
        "nothing was imported (the import is one transaction, rolled back); run "
        "`shadowproxy labels import` again"))
    print(f"{path}: {result.rows} rows; {result.inserted} new labels, {result.updated} "
          f"changed, {result.unchanged} unchanged"
          + (f"; {result.skipped_empty} rows without id or label skipped"
             if result.skipped_empty else "")
          + (f"; {result.duplicates_in_file} repeated ids (the last row wins)"
             if result.duplicates_in_file else ""))
    mixed = result.mixed_spellings()
    if mixed is not None:
        print(f"warning: {path}: {mixed}", file=sys.stderr)
    if result.unknown_ids:
        print(f"{result.unknown_ids} request ids match no recorded request (yet), e.g. "
              f"{', '.join(result.unknown_examples)}; they are stored and will join their "
              "records if those arrive later")
    return 0
