"""A real PostgreSQL made slow for real, for the recorder's overflow tests.

A statement trigger sleeps 200 ms on every write to ``shadowproxy.requests``, so the
database takes at most one batch per 200 ms, however small.
"""

from __future__ import annotations

import asyncpg

_SLOW_INSERTS = """
CREATE FUNCTION public.slow_down() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(0.2); RETURN NULL; END $$;
CREATE TRIGGER slow_down AFTER INSERT ON shadowproxy.requests
    FOR EACH STATEMENT EXECUTE FUNCTION public.slow_down();
"""


async def slow_down_inserts(database_url: str) -> None:
    await _execute(database_url, _SLOW_INSERTS)


async def speed_up_inserts(database_url: str) -> None:
    """The database at its own speed again (``slow_down_inserts`` undone)."""
    await _execute(database_url, "DROP TRIGGER slow_down ON shadowproxy.requests")


async def _execute(database_url: str, sql: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def stored(database_url: str) -> tuple[int, int]:
    """(distinct requests, responses) in the database."""
    conn = await asyncpg.connect(database_url)
    try:
        requests = await conn.fetchval("SELECT count(DISTINCT id) FROM shadowproxy.requests")
        responses = await conn.fetchval("SELECT count(*) FROM shadowproxy.responses")
    finally:
        await conn.close()
    return requests, responses
