"""The COPY writer against a real PostgreSQL: fast path, checking path, idempotency."""

from __future__ import annotations

import time

import asyncpg

from shadowproxy.config import RecordingConfig
from shadowproxy.models import CapturedResponse, Exchange
from shadowproxy.recorder.postgres import PostgresWriter
from shadowproxy.recorder.rows import RowEncoder


def exchanges(n: int) -> list[Exchange]:
    out = []
    for i in range(n):
        ex = Exchange("r", time.time(), "POST", "/p", "", [(b"Content-Type", b"application/json")],
                      "127.0.0.1", None)
        ex.body = b'{"i": %d}' % i
        ex.body_size = len(ex.body)
        resp = CapturedResponse("primary", "primary", time.time())
        resp.status, resp.headers, resp.body = 200, [], b'{"prediction": 1}'
        ex.responses.append(resp)
        out.append(ex)
    return out


async def counts(url: str) -> tuple[int, int, int]:
    conn = await asyncpg.connect(url)
    try:
        return (await conn.fetchval("SELECT count(*) FROM shadowproxy.requests"),
                await conn.fetchval("SELECT count(*) FROM shadowproxy.responses"),
                await conn.fetchval("SELECT count(*) FROM shadowproxy.requests "
                                    "WHERE body_json IS NOT NULL"))
    finally:
        await conn.close()


async def test_a_batch_written_twice_is_stored_once(database_url: str) -> None:
    """Writing the same batch again (a replay) adds nothing, by either path."""
    rows = RowEncoder(RecordingConfig()).encode(exchanges(50))
    writer = PostgresWriter(database_url)
    try:
        await writer.write(*rows)
        await writer.write(*rows)
        await writer.write(*rows, replay=True)
    finally:
        await writer.close()
    assert await counts(database_url) == (50, 50, 50)


async def test_a_value_postgres_refuses_does_not_block_the_batch(database_url: str) -> None:
    """A JSON text PostgreSQL rejects is stored with NULL JSON; the rest of the batch lands."""
    requests, responses = RowEncoder(RecordingConfig()).encode(exchanges(10))
    bad = list(requests[3])
    bad[9] = '{"nul": "\\u0000"}'  # valid for most parsers, refused by jsonb
    requests[3] = tuple(bad)
    writer = PostgresWriter(database_url)
    try:
        await writer.write(requests, responses)
    finally:
        await writer.close()
    assert await counts(database_url) == (10, 10, 9)
