"""Pruning by partition against the batched delete it replaces, on generated records.

Two databases on one PostgreSQL get the same records: --requests requests spread evenly
over the last --days days, each with one answer (2 × --requests rows in all; ten million by
default). One has the unpartitioned tables of migrations 001-004 and is pruned with the
batched DELETE that ``shadowproxy prune`` used before partitioning (5,000 requests and their
answers per transaction); the other has today's day-partitioned tables and is pruned with
``shadowproxy.store.prune.prune`` (detach and drop whole partitions, batched delete in the
one across the cutoff). Both cut at --older-than (half the records by default). Reported:
each prune's wall time, rows removed, and the table sizes before and after (a DELETE leaves
dead rows for VACUUM to reclaim; a dropped partition gives its disk back at once), plus the
time of the VACUUM the delete leaves behind.

    .venv/bin/python bench/prune_bench.py                      # 5,000,000 requests
    .venv/bin/python bench/prune_bench.py --requests 200000   # a quick look

The database is the server at --database-url (two databases are created on it and dropped
after), or an embedded PostgreSQL in a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from shadowproxy.store.migrate import available
from shadowproxy.store.partitions import ensure
from shadowproxy.store.prune import prune

# The batched delete of `shadowproxy prune` before partitioning, verbatim.
OLD_DELETE_BATCH = """
WITH doomed AS (
    SELECT id FROM shadowproxy.requests
    WHERE received_at < $1
    ORDER BY received_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone_responses AS (
    DELETE FROM shadowproxy.responses WHERE request IN (SELECT id FROM doomed) RETURNING 1
), gone_requests AS (
    DELETE FROM shadowproxy.requests WHERE id IN (SELECT id FROM doomed) RETURNING 1
)
SELECT (SELECT count(*) FROM gone_requests) AS requests,
       (SELECT count(*) FROM gone_responses) AS responses
"""

FILL = """
INSERT INTO shadowproxy.requests (id, request_id, route, received_at, method, path, body_json,
                                  body_size)
SELECT gen_random_uuid(), 'r' || i, 'bench', $1::timestamptz - make_interval(secs => i * $2),
       'POST', '/predict', jsonb_build_object('x', i), 12
FROM generate_series(1, $3) i;
"""
FILL_ANSWERS = """
INSERT INTO shadowproxy.responses (request, target, role, status, body_json, latency_ms
                                   {extra_columns})
SELECT id, 'primary', 'primary', 200, '{{"prediction": 1.5}}', 2.5 {extra_values}
FROM shadowproxy.requests;
"""
SIZE = ("SELECT pg_total_relation_size('shadowproxy.requests') "
        "+ pg_total_relation_size('shadowproxy.responses')")
# A partitioned table's own size is 0: its partitions are summed.
SIZE_PARTITIONED = """
SELECT coalesce(sum(pg_total_relation_size(relid)), 0)::bigint
FROM (SELECT relid FROM pg_partition_tree('shadowproxy.requests')
      UNION ALL SELECT relid FROM pg_partition_tree('shadowproxy.responses')) t
"""


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def schema(conn: asyncpg.Connection, up_to: int) -> None:
    """Apply the shipped migrations up to ``up_to``, as a release of that time did."""
    await conn.execute(
        "CREATE SCHEMA IF NOT EXISTS shadowproxy; CREATE TABLE IF NOT EXISTS "
        "shadowproxy.schema_migrations (version int PRIMARY KEY, name text NOT NULL, "
        "applied_at timestamptz NOT NULL DEFAULT now())")
    for mig in available():
        if mig.version <= up_to:
            await conn.execute(mig.sql)
            await conn.execute("INSERT INTO shadowproxy.schema_migrations (version, name) "
                               "VALUES ($1, $2)", mig.version, mig.name)


async def fill(conn: asyncpg.Connection, requests: int, days: int, partitioned: bool) -> float:
    """Generate the records; return the seconds it took."""
    started = time.perf_counter()
    now = await conn.fetchval("SELECT now()")
    if partitioned:
        await ensure(conn, "day", now=now - timedelta(days=days + 1), ahead=days + 2)
    await conn.execute(FILL, now, days * 86400.0 / requests, requests)
    extra = (", received_at", ", received_at") if partitioned else ("", "")
    await conn.execute(FILL_ANSWERS.format(extra_columns=extra[0], extra_values=extra[1]))
    await conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


async def old_prune(url: str, older_than: timedelta, batch: int) -> tuple[int, int, int]:
    """The previous prune: (requests, responses, batches)."""
    conn = await asyncpg.connect(url)
    try:
        cutoff = await conn.fetchval("SELECT now() - $1::interval", older_than)
        requests = responses = batches = 0
        while True:
            row = await conn.fetchrow(OLD_DELETE_BATCH, cutoff, batch)
            if row["requests"] == 0:
                return requests, responses, batches
            requests += row["requests"]
            responses += row["responses"]
            batches += 1
    finally:
        await conn.close()


async def run(server: str, requests: int, days: int, older_than: timedelta) -> dict[str, object]:
    out: dict[str, object] = {"requests": requests, "rows": 2 * requests, "days": days,
                              "older_than_days": older_than.days}
    admin = await asyncpg.connect(server)
    names = {kind: f"prune_bench_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("old", "new")}
    try:
        for name in names.values():
            await admin.execute(f'CREATE DATABASE "{name}"')
        for kind, name in names.items():
            url = with_database(server, name)
            conn = await asyncpg.connect(url)
            try:
                partitioned = kind == "new"
                await schema(conn, 99 if partitioned else 4)
                out[f"{kind}_fill_s"] = round(await fill(conn, requests, days, partitioned), 1)
                size = SIZE_PARTITIONED if partitioned else SIZE
                out[f"{kind}_bytes_before"] = await conn.fetchval(size)
                started = time.perf_counter()
                if partitioned:
                    result = await prune(url, older_than)
                    removed = (result.requests, result.responses)
                    out["new_partitions_dropped"] = len(result.dropped)
                    out["new_straddle_batches"] = result.batches
                    out["new_removed_estimated"] = result.estimated
                else:
                    r, a, b = await old_prune(url, older_than, 5000)
                    removed = (r, a)
                    out["old_batches"] = b
                out[f"{kind}_prune_s"] = round(time.perf_counter() - started, 2)
                out[f"{kind}_removed"] = removed
                out[f"{kind}_bytes_after_prune"] = await conn.fetchval(size)
                started = time.perf_counter()
                await conn.execute("VACUUM shadowproxy.requests, shadowproxy.responses")
                out[f"{kind}_vacuum_after_s"] = round(time.perf_counter() - started, 2)
                out[f"{kind}_bytes_after_vacuum"] = await conn.fetchval(size)
                out[f"{kind}_left"] = await conn.fetchval(
                    "SELECT count(*) FROM shadowproxy.requests")
            finally:
                await conn.close()
    finally:
        for name in names.values():
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    out["speedup"] = round(float(out["old_prune_s"]) / max(float(out["new_prune_s"]), 1e-3), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5_000_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--older-than-days", type=int, default=30)
    parser.add_argument("--database-url", help="a server to create the two databases on "
                                               "(default: an embedded PostgreSQL)")
    args = parser.parse_args()
    older_than = timedelta(days=args.older_than_days)
    if args.database_url:
        result = asyncio.run(run(args.database_url, args.requests, args.days, older_than))
    else:
        from shadowproxy.store.embedded import embedded_server

        with tempfile.TemporaryDirectory(prefix="prune-bench-") as tmp:
            Path(tmp).chmod(0o755)  # as root, the server runs as its own user
            with embedded_server(Path(tmp)) as url:
                result = asyncio.run(run(url, args.requests, args.days, older_than))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
