"""Writing batches to PostgreSQL: COPY into temporary tables, then an idempotent INSERT.

COPY is the fastest way in; the temporary tables let one ``INSERT ... SELECT ... ON
CONFLICT DO NOTHING`` per table parse JSON text into jsonb on the server and skip records
that a spool replay already stored. One connection, owned by the recorder's writer task.
"""

from __future__ import annotations

import asyncio

import asyncpg

from shadowproxy.errors import DatabaseError
from shadowproxy.recorder.rows import REQUEST_COLUMNS, RESPONSE_COLUMNS, Row
from shadowproxy.store.database import CONNECTION_ERRORS, describe
from shadowproxy.store.migrate import apply as apply_migrations

_TEMP_TABLES = """
CREATE TEMP TABLE IF NOT EXISTS _sp_requests (
    id uuid, request_id text, route text, received_at timestamptz, method text, path text,
    query text, headers text[], body bytea, body_text text, body_size bigint,
    body_truncated boolean, client_addr text
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS _sp_responses (
    request uuid, target text, role text, status int, headers text[], body bytea,
    body_text text, body_size bigint, body_truncated boolean, latency_ms double precision,
    error text, started_at timestamptz
) ON COMMIT DELETE ROWS;
"""

_INSERT_REQUESTS = """
INSERT INTO shadowproxy.requests (id, request_id, route, received_at, method, path, query,
    headers, body, body_json, body_size, body_truncated, client_addr)
SELECT id, request_id, route, received_at, method, path, query,
       COALESCE(jsonb_object(headers), '{}'::jsonb), body, shadowproxy.try_jsonb(body_text),
       body_size, body_truncated, client_addr
FROM _sp_requests
ON CONFLICT (id) DO NOTHING
"""

_INSERT_RESPONSES = """
INSERT INTO shadowproxy.responses (request, target, role, status, headers, body, body_json,
    body_size, body_truncated, latency_ms, error, started_at)
SELECT request, target, role, status, jsonb_object(headers), body,
       shadowproxy.try_jsonb(body_text), body_size, body_truncated, latency_ms, error,
       started_at
FROM _sp_responses
ON CONFLICT (request, target) DO NOTHING
"""


class PostgresWriter:
    """Writes (request rows, response rows) batches over one connection, reconnecting."""

    def __init__(self, url: str, *, timeout: float = 15.0) -> None:
        self.url = url
        self.timeout = timeout
        self._conn: asyncpg.Connection | None = None

    async def _connection(self) -> asyncpg.Connection:
        conn = self._conn
        if conn is None or conn.is_closed():
            conn = await asyncpg.connect(self.url, timeout=self.timeout)
            # A database that was down at start-up may never have been migrated.
            await apply_migrations(conn)
            await conn.execute(_TEMP_TABLES)
            self._conn = conn
        return conn

    async def write(self, requests: list[Row], responses: list[Row]) -> None:
        """Store one batch in one transaction; DatabaseError if it could not be stored."""
        try:
            await asyncio.wait_for(self._write(requests, responses), self.timeout)
        except (TimeoutError, *CONNECTION_ERRORS, asyncpg.PostgresError, DatabaseError) as exc:
            await self._drop_connection()
            raise DatabaseError(f"could not write to {describe(self.url)}: "
                                f"{exc or type(exc).__name__}") from exc

    async def _write(self, requests: list[Row], responses: list[Row]) -> None:
        conn = await self._connection()
        async with conn.transaction():
            await conn.copy_records_to_table("_sp_requests", records=requests,
                                             columns=REQUEST_COLUMNS)
            if responses:
                await conn.copy_records_to_table("_sp_responses", records=responses,
                                                 columns=RESPONSE_COLUMNS)
            await conn.execute(_INSERT_REQUESTS)
            if responses:
                await conn.execute(_INSERT_RESPONSES)

    async def ping(self) -> bool:
        """True if the database answers now."""
        try:
            conn = await asyncio.wait_for(self._connection(), self.timeout)
            await asyncio.wait_for(conn.fetchval("SELECT 1"), self.timeout)
            return True
        except (TimeoutError, *CONNECTION_ERRORS, asyncpg.PostgresError, DatabaseError):
            await self._drop_connection()
            return False

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 5.0)
            except (TimeoutError, *CONNECTION_ERRORS, asyncpg.PostgresError):
                conn.terminate()
