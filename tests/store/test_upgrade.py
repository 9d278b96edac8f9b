"""Upgrading a database of unpartitioned tables (migrations 001-004) in place: every row ends
up in the partitioned tables exactly once, also while a real proxy under load keeps writing,
and a second migrate does nothing."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from shadowproxy.app import running
from shadowproxy.errors import MigrationError
from shadowproxy.store.migrate import migrate_all
from tests.conftest import make_settings, route
from tests.store.test_migrate import apply_up_to
from tests.upstreams import model, serve

SEED_DAYS = 3


async def seed_legacy(url: str, requests: int) -> None:
    """A database at migration 004 holding ``requests`` records (a primary and a shadow
    answer each) spread over the last SEED_DAYS days, an answer whose request is gone, and a
    label."""
    conn = await asyncpg.connect(url)
    try:
        await apply_up_to(conn, 4)
        await conn.execute(f"""
            INSERT INTO shadowproxy.requests (id, request_id, route, received_at, method, path,
                                              body_json)
            SELECT gen_random_uuid(), 'legacy-' || i, 'r',
                   now() - make_interval(secs => i * {SEED_DAYS * 86400.0 / requests}),
                   'POST', '/predict', jsonb_build_object('i', i)
            FROM generate_series(1, {requests}) i;
            INSERT INTO shadowproxy.responses (request, target, role, status, body_json,
                                               error_kind)
            SELECT id, t, CASE t WHEN 'primary' THEN 'primary' ELSE 'shadow' END, 200,
                   '{{"prediction": 1}}', NULL
            FROM shadowproxy.requests, unnest(ARRAY['primary', 's1']) t;
            INSERT INTO shadowproxy.responses (request, target, role, status, started_at)
            VALUES (gen_random_uuid(), 's1', 'shadow', 200, now() - interval '1 day');
            INSERT INTO shadowproxy.labels (request_id, label) VALUES ('legacy-1', '1');""")
    finally:
        await conn.close()


async def check_moved(url: str, legacy: int) -> None:
    """Every seeded record is in the partitioned tables once, with its answers in its own
    partition; the legacy tables are gone; nothing waits in DEFAULT."""
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval(
            "SELECT to_regclass('shadowproxy.requests_legacy')") is None
        counts = await conn.fetchrow("""
            SELECT count(*) AS requests, count(DISTINCT id) AS ids
            FROM shadowproxy.requests WHERE request_id LIKE 'legacy-%'""")
        assert (counts["requests"], counts["ids"]) == (legacy, legacy)
        answers = await conn.fetchval("""
            SELECT count(*) FROM shadowproxy.requests q JOIN shadowproxy.responses r
            ON r.request = q.id AND r.received_at = q.received_at
            AND r.tableoid::regclass::text = replace(q.tableoid::regclass::text,
                                                     'requests_', 'responses_')
            WHERE q.request_id LIKE 'legacy-%'""")
        assert answers == 2 * legacy
        assert await conn.fetchval(
            "SELECT count(*) FROM shadowproxy.pairs WHERE request_id LIKE 'legacy-%'") == legacy
        orphan = await conn.fetchval(
            "SELECT count(*) FROM shadowproxy.responses r WHERE NOT EXISTS ("
            "SELECT 1 FROM shadowproxy.requests q WHERE q.id = r.request)")
        assert orphan == 1
        assert await conn.fetchval("SELECT count(*) FROM shadowproxy.requests_default") == 0
        assert await conn.fetchval("SELECT count(*) FROM shadowproxy.responses_default") == 0
        assert await conn.fetchval("SELECT count(*) FROM shadowproxy.labels") == 1
    finally:
        await conn.close()


async def test_an_unpartitioned_database_upgrades_in_place(empty_database_url: str) -> None:
    """Migrate moves the rows of migrations 001-004's tables into partitions of their days,
    in batches, exactly once; the second migrate applies, creates and moves nothing."""
    await seed_legacy(empty_database_url, 2000)
    done = await migrate_all(empty_database_url, "day", batch_size=300)
    assert [m.version for m in done.applied] == [5, 6]  # partitions, then the hourly summaries
    assert (done.moved.requests, done.moved.responses, done.moved.finished) == (
        2000, 4001, True)
    await check_moved(empty_database_url, 2000)
    again = await migrate_all(empty_database_url, "day")
    assert (again.applied, again.created) == ([], [])
    assert (again.moved.requests, again.moved.responses) == (0, 0)


CLIENTS = 4


async def _load(port: int, stop: asyncio.Event, answered: list[str]) -> None:
    """Clients sending as fast as the proxy answers until ``stop``; ids of 200 answers."""
    async def client(c: int) -> None:
        async with aiohttp.ClientSession() as session:
            i = 0
            while not stop.is_set():
                rid = f"live-{c}-{i}"
                i += 1
                async with session.post(f"http://127.0.0.1:{port}/predict",
                                        json={"features": {"x": i}},
                                        headers={"X-Request-Id": rid}) as resp:
                    await resp.read()
                    if resp.status == 200:
                        answered.append(rid)

    await asyncio.gather(*(client(c) for c in range(CLIENTS)))


@pytest.mark.timeout(240)
async def test_migrate_in_place_while_a_proxy_under_load_keeps_writing(
        empty_database_url: str, tmp_path: Path) -> None:
    """A proxy answers clients at full speed against a database of unpartitioned tables
    while `migrate` upgrades it and moves 20,000 records in small batches: every answered
    request is recorded exactly once (with both answers, in its partition), every earlier
    record too, and a second migrate does nothing."""
    legacy = 20_000
    await seed_legacy(empty_database_url, legacy)
    answered: list[str] = []
    stop = asyncio.Event()
    async with serve(model("primary")) as primary, serve(model("shadow", 2.0)) as shadow:
        settings = make_settings(tmp_path, [route(primary.url, shadow.url)])
        async with running(settings, empty_database_url) as proxy:
            load = asyncio.create_task(_load(proxy.port, stop, answered))
            await asyncio.sleep(0.5)
            during = len(answered)
            done = await migrate_all(empty_database_url, "day", batch_size=200)
            await asyncio.sleep(0.5)
            stop.set()
            await load
        records = proxy.metrics.records
    assert during > 0 and len(answered) > during + 50, "the load did not run during migrate"
    assert done.moved.finished
    assert records["spooled"] == records["dropped"] == 0
    await check_moved(empty_database_url, legacy)
    conn = await asyncpg.connect(empty_database_url)
    try:
        rows = await conn.fetch("""
            SELECT q.request_id, count(*) OVER (PARTITION BY q.request_id) AS copies,
                   (SELECT count(*) FROM shadowproxy.responses r WHERE r.request = q.id
                    AND r.received_at = q.received_at) AS answers
            FROM shadowproxy.requests q WHERE q.request_id LIKE 'live-%'""")
    finally:
        await conn.close()
    stored = {r["request_id"]: (r["copies"], r["answers"]) for r in rows}
    assert set(answered) <= set(stored), "answered requests missing from the database"
    assert {stored[rid] for rid in answered} == {(1, 2)}
    again = await migrate_all(empty_database_url, "day")
    assert (again.applied, again.created, again.moved.requests) == ([], [], 0)


async def test_records_spooled_before_the_upgrade_replay_into_the_new_tables(
        empty_database_url: str, tmp_path: Path) -> None:
    """A record a proxy could not write before the upgrade (spooled) and one already in the
    legacy tables with the same id are one record after the move (ON CONFLICT DO NOTHING)."""
    await seed_legacy(empty_database_url, 10)
    conn = await asyncpg.connect(empty_database_url)
    try:
        row = await conn.fetchrow("SELECT id, received_at FROM shadowproxy.requests LIMIT 1")
        from shadowproxy.store.migrate import apply

        await apply(conn)
        await conn.execute(
            "INSERT INTO shadowproxy.requests (id, request_id, route, received_at, method, path)"
            " VALUES ($1, 'again', 'r', $2, 'POST', '/')", row["id"], row["received_at"])
    finally:
        await conn.close()
    done = await migrate_all(empty_database_url, "day")
    assert done.moved.requests == 10
    conn = await asyncpg.connect(empty_database_url)
    try:
        copies = await conn.fetchval("SELECT count(*) FROM shadowproxy.requests WHERE id = $1",
                                     row["id"])
        total = await conn.fetchval("SELECT count(*) FROM shadowproxy.requests")
    finally:
        await conn.close()
    assert (copies, total) == (1, 10)
    assert uuid.UUID(str(row["id"]))


async def test_the_pairs_view_keeps_its_grants_and_the_views_built_on_it(
        empty_database_url: str) -> None:
    """A role that was granted the pairs view only (THREAT_MODEL.md's analysts) reads it after
    the upgrade, and a view of the user's own over pairs does not stop the upgrade."""
    await seed_legacy(empty_database_url, 50)
    role = f"analyst_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute(f"""
            CREATE ROLE {role};
            GRANT USAGE ON SCHEMA shadowproxy TO {role};
            GRANT SELECT ON shadowproxy.pairs TO {role};
            CREATE VIEW public.pairs_per_route AS
                SELECT route, count(*) AS n FROM shadowproxy.pairs GROUP BY route;""")
        done = await migrate_all(empty_database_url, "day")
        assert done.moved.finished
        assert await conn.fetchval("SELECT n FROM public.pairs_per_route") == 50
        async with conn.transaction():
            await conn.execute(f"SET LOCAL ROLE {role}")
            assert await conn.fetchval("SELECT count(*) FROM shadowproxy.pairs") == 50
    finally:
        # Roles belong to the server, which other tests' databases share.
        await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
        await conn.close()


@pytest.mark.parametrize("records", [0, 30])
async def test_a_view_over_the_old_tables_is_named_and_the_upgrade_ends_once_it_is_gone(
        empty_database_url: str, records: int) -> None:
    """A view of the user's over `requests` follows the rename to `requests_legacy`: every row
    is still moved, and the legacy tables stay until the view is gone, with an error that
    names it and says what to do (not PostgreSQL's DROP ... CASCADE, nor to run migrate again
    as it is); the migrations themselves apply, also to an empty database."""
    if records:
        await seed_legacy(empty_database_url, records)
    conn = await asyncpg.connect(empty_database_url)
    try:
        if not records:
            await apply_up_to(conn, 4)
        await conn.execute("CREATE VIEW public.my_requests AS "
                           "SELECT route, received_at FROM shadowproxy.requests")
        with pytest.raises(MigrationError) as caught:
            await migrate_all(empty_database_url, "day")
        message = str(caught.value)
        assert "view my_requests depends on table shadowproxy.requests_legacy" in message
        assert "create them again over shadowproxy.requests" in message
        assert await conn.fetchval(
            "SELECT count(*) FROM shadowproxy.requests WHERE request_id LIKE 'legacy-%'"
        ) == records
        await conn.execute("DROP VIEW public.my_requests")
    finally:
        await conn.close()
    done = await migrate_all(empty_database_url, "day")
    assert done.applied == [] and done.moved.finished
    if records:
        await check_moved(empty_database_url, records)


async def test_every_privilege_on_the_old_tables_carries_over(empty_database_url: str) -> None:
    """Grants on the old tables reach the partitioned ones: to a role whose name needs quotes
    (the migration failed on it), on single columns, and with their grant option."""
    await seed_legacy(empty_database_url, 10)
    tag = uuid.uuid4().hex[:8]
    quoted, columns = f'"Report Reader {tag}"', f"columns_{tag}"
    expected = [  # role, table, column (None: the table), privilege, held after the upgrade
        (quoted, "requests", None, "SELECT", True),
        (quoted, "responses", None, "SELECT", True),
        (columns, "requests", "route", "SELECT", True),
        (columns, "requests", "received_at", "SELECT", True),
        (columns, "requests", "body", "SELECT", False),
        (columns, "responses", "status", "UPDATE", True),
        (columns, "responses", "body", "SELECT", False),
        (columns, "requests", None, "INSERT WITH GRANT OPTION", True),
    ]
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute(f"""
            CREATE ROLE {quoted};
            CREATE ROLE {columns};
            GRANT SELECT ON shadowproxy.requests, shadowproxy.responses TO {quoted};
            GRANT SELECT (route, received_at) ON shadowproxy.requests TO {columns};
            GRANT SELECT (target, status), UPDATE (status) ON shadowproxy.responses
                TO {columns};
            GRANT INSERT ON shadowproxy.requests TO {columns} WITH GRANT OPTION;""")
        await migrate_all(empty_database_url, "day")
        held = []
        for role, table, column, privilege, _ in expected:
            role = role.strip('"')  # a name here, not an identifier
            if column is None:
                held.append(await conn.fetchval("SELECT has_table_privilege($1, $2, $3)",
                                                role, f"shadowproxy.{table}", privilege))
            else:
                held.append(await conn.fetchval(
                    "SELECT has_column_privilege($1, $2, $3, $4)",
                    role, f"shadowproxy.{table}", column, privilege))
    finally:
        # Roles belong to the server, which other tests' databases share.
        await conn.execute(f"DROP OWNED BY {quoted}, {columns}; DROP ROLE {quoted}, {columns}")
        await conn.close()
    assert held == [e[-1] for e in expected], list(zip(expected, held, strict=True))
