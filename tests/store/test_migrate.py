"""Schema migrations against a real PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from shadowproxy.store.migrate import apply, available, migrate
from tests.db import execute
from tests.replay.helpers import cli, write_config


async def test_migrate_creates_tables_and_view(empty_database_url: str) -> None:
    """A first migration creates the requests and responses tables and the pairs view."""
    applied = await migrate(empty_database_url)
    assert [m.version for m in applied] == [m.version for m in available()]
    conn = await asyncpg.connect(empty_database_url)
    try:
        names = {r["table_name"] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'shadowproxy'")}
    finally:
        await conn.close()
    assert {"requests", "responses", "pairs", "schema_migrations"} <= names


async def test_migrate_twice_applies_nothing(database_url: str) -> None:
    """Running migrate on an up-to-date schema applies nothing and fails nothing."""
    assert await migrate(database_url) == []


async def test_concurrent_migrations_apply_once(empty_database_url: str) -> None:
    """Several processes migrating at once apply each migration exactly once."""
    conns = [await asyncpg.connect(empty_database_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(apply(c) for c in conns))
        versions = await conns[0].fetch("SELECT version FROM shadowproxy.schema_migrations")
    finally:
        for c in conns:
            await c.close()
    assert sum(len(r) for r in results) == len(available())
    assert len(versions) == len(available())


async def test_try_jsonb_accepts_json_and_rejects_the_rest(database_url: str) -> None:
    """try_jsonb turns valid JSON text into jsonb and anything else into NULL."""
    conn = await asyncpg.connect(database_url)
    try:
        good = await conn.fetchval("SELECT shadowproxy.try_jsonb('{\"a\": [1, 2]}')::text")
        bad = await conn.fetchval("SELECT shadowproxy.try_jsonb('{not json')")
        nul = await conn.fetchval("SELECT shadowproxy.try_jsonb('\"\\u0000\"')")
    finally:
        await conn.close()
    assert good == '{"a": [1, 2]}'
    assert bad is None
    assert nul is None



async def test_rows_of_a_few_kilobytes_are_stored_uncompressed(database_url: str) -> None:
    """A row with a 1 KB JSON body twice over stays inline and uncompressed (no pglz on the
    write path); one over a page is still compressed."""
    conn = await asyncpg.connect(database_url)
    rollback = conn.transaction()  # leaves the shared test database as it was
    await rollback.start()
    try:
        compression = []
        for text in ('{"v": "' + "ab" * 500 + '"}', '{"v": "' + "ab" * 5000 + '"}'):
            row_id = await conn.fetchval(
                "INSERT INTO shadowproxy.requests (id, request_id, route, received_at, "
                "method, path, body, body_json) VALUES (gen_random_uuid(), 'x', 'r', now(), "
                "'POST', '/', convert_to($1, 'UTF8'), $1::jsonb) RETURNING id", text)
            # Read back: RETURNING would show the row before PostgreSQL compressed it.
            compression.append(await conn.fetchrow(
                "SELECT pg_column_compression(body) AS body, pg_column_compression(body_json) "
                "AS body_json FROM shadowproxy.requests WHERE id = $1", row_id))
    finally:
        await rollback.rollback()
        await conn.close()
    assert tuple(compression[0]) == (None, None)
    assert compression[1]["body_json"] is not None


async def test_error_kinds_are_mapped_from_the_text_of_earlier_rows(
        empty_database_url: str) -> None:
    """Rows stored before error kinds existed get the kind their error text names, the same
    kind the recorder gives rows of an old spool file."""
    from shadowproxy.failures import kind_of_legacy_error

    texts = ["timeout", "connect: Connection refused", "dropped: overload",
             "skipped: body_too_large", "malformed response: invalid constant string",
             "closed: proxy is shutting down", "closed: proxy shutting down",
             "closed: [Errno 104] Connection reset by peer",
             "closed: upstream closed the connection before the response ended",
             "closed: client disconnected"]
    conn = await asyncpg.connect(empty_database_url)
    try:
        await apply_up_to(conn, 3)
        for i, text in enumerate(texts):
            await conn.execute(
                "INSERT INTO shadowproxy.responses (request, target, role, error) "
                "VALUES (gen_random_uuid(), $1, 'shadow', $2)", f"s{i}", text)
        await migrate(empty_database_url)
        rows = await conn.fetch("SELECT error, error_kind FROM shadowproxy.responses")
    finally:
        await conn.close()
    kinds = {r["error"]: r["error_kind"] for r in rows}
    assert kinds == {text: kind_of_legacy_error(text) for text in texts}
    assert [kinds[t] for t in texts] == [
        "timeout", "connect", "dropped", "skipped", "protocol", "shutdown", "shutdown",
        "reset", "closed", "closed"]


async def apply_up_to(conn: asyncpg.Connection, version: int) -> None:
    """Apply the shipped migrations up to ``version`` only, as an earlier release did."""
    await conn.execute(
        "CREATE SCHEMA IF NOT EXISTS shadowproxy;"
        "CREATE TABLE IF NOT EXISTS shadowproxy.schema_migrations ("
        " version int PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())")
    for mig in available():
        if mig.version <= version:
            async with conn.transaction():
                await conn.execute(mig.sql)
                await conn.execute("INSERT INTO shadowproxy.schema_migrations (version, name)"
                                   " VALUES ($1, $2)", mig.version, mig.name)


async def test_migrate_on_a_database_migrated_by_a_newer_version_says_so(
        database_url: str, tmp_path: Path) -> None:
    """A database that a newer shadowproxy migrated (a rollback of the proxy) holds a
    migration this version does not know: `shadowproxy migrate` says so, and what to do,
    with exit status 1. It said `schema is up to date`."""
    await execute(database_url, "INSERT INTO shadowproxy.schema_migrations (version, name) "
                                "VALUES (901, 'from_a_newer_release')")
    result = await cli("migrate", "-c", str(write_config(tmp_path, database_url)))
    assert result.status == 1, result.err
    assert "schema is up to date" not in result.out
    last = available()[-1]
    assert result.err == (
        "shadowproxy: the database holds migration 901_from_a_newer_release, which this "
        f"shadowproxy does not know (its last is {last.version:03d}_{last.name}): a newer "
        "version migrated it; run that version or a later one against it\n"), result.err
