"""``shadowproxy labels import``: load ``request_id,label`` rows into ``shadowproxy.labels``.

The import is an upsert, so running it twice changes nothing and a corrected file replaces
earlier labels. A label is stored as JSON: ``1``, ``0.5``, ``true`` and ``[1, 0, 1]`` (a batch
request, one label per prediction) keep their JSON type; anything else is a string. Ids that
match no recorded request are stored anyway (their records may still be in the proxy's spool)
and reported, with examples, so that a file with the wrong ids is noticed at once.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from shadowproxy.errors import DatabaseError, UsageError


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


def _label_json(text: str) -> str:
    """The label as JSON text: JSON values are kept, anything else becomes a JSON string."""
    try:
        json.loads(text)
    except ValueError:
        return json.dumps(text)
    return text


def read_labels(path: Path) -> tuple[dict[str, str], LabelImport]:
    """Read the CSV into {request_id: label JSON}; UsageError says what is wrong with it."""
    result = LabelImport()
    labels: dict[str, str] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = {(c or "").strip().lower(): c for c in reader.fieldnames or []}
            if "request_id" not in columns or "label" not in columns:
                raise UsageError(
                    f"{path}: expected a header row with the columns request_id,label "
                    f"(found {reader.fieldnames or 'no header'})")
            id_col, label_col = columns["request_id"], columns["label"]
            for row in reader:
                result.rows += 1
                request_id = (row.get(id_col) or "").strip()
                label = (row.get(label_col) or "").strip()
                if not request_id or not label:
                    result.skipped_empty += 1
                    continue
                if request_id in labels:
                    result.duplicates_in_file += 1
                labels[request_id] = _label_json(label)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the labels file: {exc.strerror}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"{path}: not a UTF-8 CSV file ({exc})") from exc
    return labels, result


async def import_labels(conn: asyncpg.Connection, labels: dict[str, str],
                        result: LabelImport) -> LabelImport:
    """Upsert ``labels`` in one transaction and count what changed."""
    try:
        async with conn.transaction():
            await conn.execute("CREATE TEMP TABLE _labels_in (request_id text, label text) "
                               "ON COMMIT DROP")
            await conn.copy_records_to_table("_labels_in", records=list(labels.items()))
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
        raise DatabaseError(f"importing labels failed: {exc}") from exc
    result.inserted = sum(1 for r in rows if r["inserted"])
    result.updated = len(rows) - result.inserted
    result.unchanged = len(labels) - len(rows)
    result.unknown_ids = int(unknown[0]["n"]) if unknown else 0
    result.unknown_examples = [r["request_id"] for r in unknown]
    return result


def run_labels_import(args: argparse.Namespace) -> int:
    """The CLI command: read the file, upsert, print a summary; 0 on success."""
    from shadowproxy.config import load_config
    from shadowproxy.store.database import connection, database_url

    settings = load_config(args.config)
    labels, result = read_labels(Path(args.file))
    url = database_url(settings)

    async def go() -> LabelImport:
        async with connection(url) as conn:
            return await import_labels(conn, labels, result)

    result = asyncio.run(go())
    print(f"{args.file}: {result.rows} rows; {result.inserted} new labels, {result.updated} "
          f"changed, {result.unchanged} unchanged"
          + (f"; {result.skipped_empty} rows without id or label skipped"
             if result.skipped_empty else "")
          + (f"; {result.duplicates_in_file} repeated ids (the last row wins)"
             if result.duplicates_in_file else ""))
    if result.unknown_ids:
        print(f"{result.unknown_ids} request ids match no recorded request (yet), e.g. "
              f"{', '.join(result.unknown_examples)}; they are stored and will join their "
              "records if those arrive later")
    return 0
