"""The replay's SQL: the --where relation has the pairs columns, and the pending filter is
an index probe per request of the window, however large the tables."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from shadowproxy.compare.window import Window
from shadowproxy.replay.options import ReplayOptions
from shadowproxy.replay.source import PAIRS_ROWS, RequestStream, Selection
from shadowproxy.store.database import connection
from shadowproxy.store.partitions import ensure
from tests.replay.helpers import request, store


async def _columns(conn: asyncpg.Connection, sql: str) -> list[str]:
    stmt = await conn.prepare(sql)
    return [a.name for a in stmt.get_attributes()]


async def test_the_where_relation_has_exactly_the_pairs_view_columns(database_url: str) -> None:
    """--where sees the columns of shadowproxy.pairs, in its order: a column added to the
    view must be added to source.PAIRS_ROWS too."""
    async with connection(database_url) as conn:
        assert await _columns(conn, PAIRS_ROWS) == await _columns(
            conn, "SELECT * FROM shadowproxy.pairs")


async def _plan(conn: asyncpg.Connection, sql: str, args: list[object]) -> str:
    return "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql}", *args))


def _options(hours: float, **extra: object) -> ReplayOptions:
    end = datetime.now(UTC)
    return ReplayOptions(route="r", url="http://127.0.0.1:9", name="cand",
                         window=Window(end - timedelta(hours=hours), end), **extra)  # type: ignore[arg-type]


@pytest.mark.timeout(90)
async def test_the_pending_filter_probes_the_primary_key_on_a_large_table(
        database_url: str) -> None:
    """With 200,000 requests over 20 days, half answered by the target, the last hour's
    pending requests are found in the last hour's partitions of requests and responses
    only: the cost follows the window, not the table."""
    async with connection(database_url) as conn:
        # Day partitions over the 20 days, as a proxy running through them would have made.
        now = await conn.fetchval("SELECT now()")
        await ensure(conn, "day", now=now - timedelta(days=21), ahead=22)
        await conn.execute("""
            INSERT INTO shadowproxy.requests (id, request_id, route, received_at, method, path)
            SELECT gen_random_uuid(), 'r' || i, 'r',
                   now() - make_interval(secs => i * 8.64), 'POST', '/predict'
            FROM generate_series(1, 200000) i;
            INSERT INTO shadowproxy.responses (request, target, role, status, received_at)
            SELECT id, 'primary', 'primary', 200, received_at FROM shadowproxy.requests;
            INSERT INTO shadowproxy.responses (request, target, role, status, received_at)
            SELECT id, 'cand', 'replay', 200, received_at FROM shadowproxy.requests
            WHERE request_id::text LIKE '%0' OR request_id::text LIKE '%2'
               OR request_id::text LIKE '%4' OR request_id::text LIKE '%6'
               OR request_id::text LIKE '%8';
            ANALYZE shadowproxy.requests; ANALYZE shadowproxy.responses;""")
        today = f"p{now:%Y%m%d}"
        for options in (_options(1), _options(1, where="primary_status = 200")):
            selection = Selection(options)
            # The selection's keys (fixed at the start), then the pending requests among
            # them: only the last hour's partitions are read, of both tables: today's (and
            # yesterday's, before 01:00); the 20 days' others not at all.
            window = {today, f"p{now - timedelta(hours=1):%Y%m%d}"}
            plans = [await _plan(conn, *selection.select_sql())]
            await selection.fix(conn)
            sql, args = selection.stream_sql(None)
            plans.append(await _plan(conn, sql, args))
            for plan in plans:
                read = set(re.findall(r" on (?:requests|responses)_(p\d{8})", plan))
                assert today in read and read <= window, plan
                assert "_default" not in plan, plan
            rows = await conn.fetch(sql, *args)
            assert 190 <= len(rows) <= 230  # half of the ~417 requests of the last hour


async def test_the_stream_renews_its_transaction_and_continues_in_order(
        database_url: str) -> None:
    """Read in small fetches with a renewal after every one, the stream still yields each
    pending request once, oldest first, and holds no transaction once it ends."""
    base = datetime.now(UTC).timestamp() - 600
    await store(database_url, [request(i, received_at=base + i // 3) for i in range(50)])
    async with connection(database_url) as conn:
        selection = Selection(_options(1))
        await selection.fix(conn)
        stream = RequestStream(conn, selection, read_ahead_bytes=1, renew_after_s=0.0)
        seen = []
        while rows := await stream.next_rows():
            assert len(rows) == 1  # the byte budget allows one row per fetch
            seen += [r["request_id"] for r in rows]
        assert not conn.is_in_transaction()
        expected = [r[0] for r in await conn.fetch(
            "SELECT request_id FROM shadowproxy.requests ORDER BY received_at, id")]
    assert seen == expected and len(set(seen)) == 50


async def test_a_role_that_may_not_create_temporary_tables_is_told_what_to_grant(
        database_url: str) -> None:
    """The selection is kept in a temporary table: a role without the TEMPORARY privilege
    is told so and what to grant, and its --where is not blamed for it."""
    from shadowproxy.errors import DatabaseError

    role = "sp_no_temp_" + uuid.uuid4().hex[:8]
    async with connection(database_url) as admin:
        database = await admin.fetchval("SELECT current_database()")
        await admin.execute(f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC')
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute(f"GRANT USAGE ON SCHEMA shadowproxy TO {role}")
        await admin.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA shadowproxy TO {role}")
        try:
            conn = await asyncpg.connect(database_url, user=role)
            try:
                with pytest.raises(DatabaseError) as caught:
                    await Selection(_options(1, where="primary_status = 200")).fix(conn)
            finally:
                await conn.close()
        finally:
            await admin.execute(f"DROP OWNED BY {role}")
            await admin.execute(f"DROP ROLE {role}")
    message = str(caught.value)
    assert "temporary table" in message and "--where" not in message
    assert f"GRANT TEMPORARY ON DATABASE {database} TO {role}" in message
