"""Schema migrations against a real PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg

from shadowproxy.store.migrate import apply, available, migrate


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
