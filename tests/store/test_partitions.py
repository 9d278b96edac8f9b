"""Time partitions on a real PostgreSQL: made ahead, rows moved out of DEFAULT, co-partitioned
tables, the pairs view as before, and ranges that never overlap when the period changes."""

from __future__ import annotations

import asyncio
import itertools
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from shadowproxy.store.migrate import migrate_all
from shadowproxy.store.partitions import (
    AHEAD,
    Partition,
    create,
    ensure,
    free_range,
    partitions,
    period_start,
    suffix,
)

PAIRS_COLUMNS = [
    "id", "request_id", "route", "received_at", "method", "path", "request_body_json",
    "primary_status", "primary_body_json", "primary_latency_ms", "primary_error",
    "shadow_name", "shadow_status", "shadow_body_json", "shadow_latency_ms", "shadow_error",
    "config_version", "primary_error_kind", "shadow_role", "shadow_error_kind"]
"""The view's columns as migration 004 made them: what users' queries are written against."""


async def insert_pair(conn: asyncpg.Connection, when: datetime) -> uuid.UUID:
    """One request received at ``when`` with a primary and a shadow answer."""
    rid = uuid.uuid4()
    await conn.execute(
        "INSERT INTO shadowproxy.requests (id, request_id, route, received_at, method, path) "
        "VALUES ($1, $2, 'r', $3, 'POST', '/p')", rid, str(rid), when)
    await conn.executemany(
        "INSERT INTO shadowproxy.responses (request, target, role, status, received_at) "
        "VALUES ($1, $2, $3, 200, $4)",
        [(rid, "primary", "primary", when), (rid, "s1", "shadow", when)])
    return rid


async def where(conn: asyncpg.Connection, rid: uuid.UUID) -> set[str]:
    """The partitions (both tables) holding the rows of request ``rid``, by name suffix."""
    rows = await conn.fetch(
        "SELECT tableoid::regclass::text AS t FROM shadowproxy.requests WHERE id = $1 "
        "UNION ALL SELECT tableoid::regclass::text FROM shadowproxy.responses "
        "WHERE request = $1", rid)
    return {r["t"].split(".")[-1].split("_", 1)[1] for r in rows}


def test_period_starts_and_names_are_utc() -> None:
    """Periods start on the UTC hour, day, and Monday; names follow the start."""
    when = datetime(2026, 12, 2, 14, 35, tzinfo=UTC)  # a Wednesday
    assert period_start(when, "hour") == datetime(2026, 12, 2, 14, tzinfo=UTC)
    assert period_start(when, "day") == datetime(2026, 12, 2, tzinfo=UTC)
    assert period_start(when, "week") == datetime(2026, 11, 30, tzinfo=UTC)
    assert suffix(datetime(2026, 12, 2, tzinfo=UTC)) == "p20261202"
    assert suffix(datetime(2026, 12, 2, 14, tzinfo=UTC)) == "p20261202_1400"


def test_a_changed_period_fills_only_the_gaps() -> None:
    """Switching from days to weeks: the week's partition starts where the last day ends
    and stops where the next existing one starts; a covered time needs nothing."""
    day = datetime(2026, 12, 2, tzinfo=UTC)
    existing = [Partition("requests_p20261202", day, day + timedelta(days=1), -1),
                Partition("requests_p20261205", day + timedelta(days=3),
                          day + timedelta(days=4), -1)]
    assert free_range(day + timedelta(hours=5), "week", existing) is None
    assert free_range(day + timedelta(days=1, hours=1), "week", existing) == (
        day + timedelta(days=1), day + timedelta(days=3))
    assert free_range(day + timedelta(days=4), "week", existing) == (
        day + timedelta(days=4), datetime(2026, 12, 7, tzinfo=UTC))


async def test_migrate_creates_the_partitions_ahead_for_both_tables(
        database_url: str) -> None:
    """After migrate, both tables have the same partitions: today's and a week ahead (the
    default period, day), each one day long, and a DEFAULT partition."""
    conn = await asyncpg.connect(database_url)
    try:
        today = period_start(await conn.fetchval("SELECT now()"), "day")
        requests = await partitions(conn, "requests")
        responses = await partitions(conn, "responses")
        defaults = await conn.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT' ORDER BY 1")
        kinds = await conn.fetch(
            "SELECT relname, relkind::text FROM pg_class WHERE relname IN ('requests', 'responses')"
            " AND relnamespace = 'shadowproxy'::regnamespace")
    finally:
        await conn.close()
    assert {r["relkind"] for r in kinds} == {"p"}
    assert [r["relname"] for r in defaults] == ["requests_default", "responses_default"]
    starts = [today + timedelta(days=i) for i in range(AHEAD["day"] + 1)]
    assert [(p.start, p.end) for p in requests] == [(s, s + timedelta(days=1)) for s in starts]
    assert [p.name.removeprefix("requests_") for p in requests] == \
        [p.name.removeprefix("responses_") for p in responses]
    assert requests[0].name == f"requests_{suffix(today)}"


async def test_hourly_partitions_ahead(empty_database_url: str) -> None:
    """With storage.partition: hour, the current hour and the next 48 get partitions."""
    done = await migrate_all(empty_database_url, "hour")
    assert len(done.created) == AHEAD["hour"] + 1
    conn = await asyncpg.connect(empty_database_url)
    try:
        parts = await partitions(conn)
        again = await ensure(conn, "hour")
    finally:
        await conn.close()
    assert all(p.end - p.start == timedelta(hours=1) for p in parts)
    assert again == []


async def test_rows_in_default_move_into_the_partition_made_for_them(
        database_url: str) -> None:
    """A record of a time no partition covers lands in DEFAULT (it is not refused); the next
    ensure makes its partition and moves it there, and the pairs view shows it throughout."""
    conn = await asyncpg.connect(database_url)
    try:
        far = datetime.now(UTC) + timedelta(days=60)
        rid = await insert_pair(conn, far)
        assert await where(conn, rid) == {"default"}
        assert await conn.fetchval("SELECT count(*) FROM shadowproxy.pairs WHERE id = $1",
                                   rid) == 1
        created = await ensure(conn, "day")
        assert created == [suffix(period_start(far, "day"))]
        assert await where(conn, rid) == {suffix(period_start(far, "day"))}
        assert await conn.fetchval("SELECT count(*) FROM shadowproxy.requests_default") == 0
        assert await conn.fetchval("SELECT count(*) FROM shadowproxy.responses_default") == 0
        assert await conn.fetchval("SELECT count(*) FROM shadowproxy.pairs WHERE id = $1",
                                   rid) == 1
    finally:
        await conn.close()


async def test_a_request_and_its_answers_share_a_partition(database_url: str) -> None:
    """Co-partitioning: a request's rows and its answers' rows are in partitions of the
    same range, whichever day it was received."""
    conn = await asyncpg.connect(database_url)
    try:
        now = datetime.now(UTC)
        for when in (now, now + timedelta(days=2), now + timedelta(days=5)):
            rid = await insert_pair(conn, when)
            assert await where(conn, rid) == {suffix(period_start(when, "day"))}
    finally:
        await conn.close()


async def test_the_pairs_view_keeps_its_columns_and_reads_only_the_window(
        database_url: str) -> None:
    """The pairs view has the columns of earlier versions, in order, and a condition on
    received_at reads the partitions of that window only, of both tables."""
    conn = await asyncpg.connect(database_url)
    try:
        columns = [r["column_name"] for r in await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = "
            "'shadowproxy' AND table_name = 'pairs' ORDER BY ordinal_position")]
        today = period_start(datetime.now(UTC), "day")
        for day in range(3):
            await insert_pair(conn, today + timedelta(days=day, hours=1))
        plan = "\n".join(r[0] for r in await conn.fetch(
            "EXPLAIN SELECT * FROM shadowproxy.pairs WHERE received_at >= $1 "
            "AND received_at < $2", today + timedelta(days=1), today + timedelta(days=2)))
        rows = await conn.fetch(
            "SELECT shadow_name, primary_status FROM shadowproxy.pairs "
            "WHERE received_at >= $1 AND received_at < $2",
            today + timedelta(days=1), today + timedelta(days=2))
    finally:
        await conn.close()
    assert columns == PAIRS_COLUMNS
    assert [tuple(r) for r in rows] == [("s1", 200)]
    tomorrow = suffix(today + timedelta(days=1))
    assert f"requests_{tomorrow}" in plan, plan
    assert f"responses_{tomorrow}" in plan, plan
    for other in (suffix(today), suffix(today + timedelta(days=2)), "default"):
        assert f"requests_{other}" not in plan, plan
        assert f"responses_{other}" not in plan, plan


@pytest.mark.parametrize("period", ["day", "week"])
async def test_a_changed_period_never_overlaps(empty_database_url: str, period: str) -> None:
    """Partitions made by the hour, then by `period`: no two ranges overlap and there is no
    gap from the first to the last."""
    await migrate_all(empty_database_url, "hour")
    conn = await asyncpg.connect(empty_database_url)
    try:
        await ensure(conn, period)
        parts = await partitions(conn)
    finally:
        await conn.close()
    for a, b in itertools.pairwise(parts):
        assert a.end == b.start, (a, b)
    assert parts[-1].end - parts[-1].start == (
        timedelta(days=1) if period == "day" else timedelta(weeks=1))


@pytest.mark.parametrize(("style", "zone"), [("SQL, YMD", "Asia/Kathmandu"),
                                           ("German, MDY", "Australia/Lord_Howe")])
async def test_partitions_are_listed_right_whatever_the_database_date_style(
        empty_database_url: str, style: str, zone: str) -> None:
    """A database whose DateStyle and TimeZone are set otherwise (ALTER DATABASE ... SET)
    has its partitions listed with their ranges, so that migrate runs again and ensure
    makes no partition twice. PostgreSQL prints the bounds in the session's DateStyle:
    ``12/05/2026 05:45:00 +0545`` read back as out of range ('SQL, YMD') failed every run,
    ``05.03.2026`` read back as May 3rd ('German, MDY') gave wrong ranges. The session's
    DateStyle is left as it was, also in a transaction of the caller."""
    conn = await asyncpg.connect(empty_database_url)
    try:
        name = await conn.fetchval("SELECT current_database()")
        await conn.execute(f"ALTER DATABASE \"{name}\" SET DateStyle = '{style}'")
        await conn.execute(f"ALTER DATABASE \"{name}\" SET TimeZone = '{zone}'")
    finally:
        await conn.close()
    await migrate_all(empty_database_url)
    again = await migrate_all(empty_database_url)
    conn = await asyncpg.connect(empty_database_url)
    try:
        march = datetime(2026, 3, 5, 7, tzinfo=UTC)  # days of the month 12 or less
        made = await ensure(conn, "day", now=march, ahead=2)
        parts = await partitions(conn)
        async with conn.transaction():
            in_transaction = await partitions(conn)
            after = await conn.fetchval("SHOW DateStyle")
        remade = await ensure(conn, "day", now=march, ahead=2)
    finally:
        await conn.close()
    assert again.created == []
    assert made == ["p20260305", "p20260306", "p20260307"]
    days = [datetime(2026, 3, d, tzinfo=UTC) for d in (5, 6, 7)]
    assert [(p.name, p.start, p.end) for p in parts[:3]] == [
        (f"requests_{suffix(d)}", d, d + timedelta(days=1)) for d in days]
    assert in_transaction == parts
    assert after == style
    assert remade == []


async def test_the_documented_storage_reset_reaches_the_partitions_made_later(
        database_url: str) -> None:
    """New partitions are made with toast_tuple_target = 8160, as the DEFAULT partitions
    carry it; after docs/sql.md's reset of every partition, the partitions made later are
    made without it too (a fixed setting undid the reset at the next partition)."""
    text = (Path(__file__).parents[2] / "docs" / "sql.md").read_text()
    reset = next(m.group(1) for m in re.finditer(r"```sql\n(.*?)```", text, re.DOTALL)
                 if "RESET (toast_tuple_target)" in m.group(1))
    options = ("SELECT reloptions FROM pg_class WHERE relnamespace = 'shadowproxy'::regnamespace"
               " AND relname IN ('requests_' || $1, 'responses_' || $1)")
    conn = await asyncpg.connect(database_url)
    try:
        soon = datetime.now(UTC) + timedelta(days=30)
        assert await ensure(conn, "day", now=soon, ahead=0) == [
            suffix(period_start(soon, "day"))]
        made = await conn.fetch(options, suffix(period_start(soon, "day")))
        assert [r["reloptions"] for r in made] == [["toast_tuple_target=8160"]] * 2

        await conn.execute(reset)
        later = datetime.now(UTC) + timedelta(days=60)
        assert await ensure(conn, "day", now=later, ahead=0) == [
            suffix(period_start(later, "day"))]
        made = await conn.fetch(options, suffix(period_start(later, "day")))
        assert len(made) == 2 and [r["reloptions"] for r in made] == [None, None]
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'shadowproxy.requests'::regclass "
            "AND c.reloptions IS NOT NULL") == 0
    finally:
        await conn.close()


async def _waiting_for_a_lock(conn: asyncpg.Connection, pid: int) -> bool:
    return bool(await conn.fetchval(
        "SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted", pid))


async def test_a_reader_of_both_tables_and_a_partition_being_made_do_not_deadlock(
        database_url: str) -> None:
    """A reader holding the answers' DEFAULT partition that then reads the requests' one
    (as a query over both tables can lock them), while a partition is being made: the
    maintenance never waits for one DEFAULT partition while it holds the other, so neither
    side ends in "deadlock detected"; the partition is made once the reader is done. It
    took the requests' DEFAULT partition and waited for the answers', and PostgreSQL broke
    the cycle by failing one of the two."""
    reader = await asyncpg.connect(database_url)
    maintenance = await asyncpg.connect(database_url)
    start = datetime(2031, 1, 1, tzinfo=UTC)
    try:
        tx = reader.transaction()
        await tx.start()
        await reader.fetchval("SELECT count(*) FROM shadowproxy.responses_default")
        making = asyncio.create_task(create(maintenance, start, start + timedelta(hours=1)))
        pid = maintenance.get_server_pid()
        for _ in range(50):  # until it waits for the lock the reader holds, or tries again
            await asyncio.sleep(0.02)
            if await _waiting_for_a_lock(reader, pid):
                break
        await asyncio.sleep(0.2)
        assert await reader.fetchval("SELECT count(*) FROM shadowproxy.requests_default") == 0
        await tx.commit()
        assert await asyncio.wait_for(making, 10) == suffix(start)
    finally:
        await reader.close()
        await maintenance.close()
    conn = await asyncpg.connect(database_url)
    try:
        names = {p.name for t in ("requests", "responses") for p in await partitions(conn, t)}
    finally:
        await conn.close()
    assert {f"requests_{suffix(start)}", f"responses_{suffix(start)}"} <= names


async def test_one_run_moves_every_row_out_of_default(database_url: str) -> None:
    """Rows of several periods wait in DEFAULT, some of one week on both sides of a day's
    partition made before the period changed: one ensure makes a partition for each of
    them, and DEFAULT is left empty (the rows after the day's partition stayed there until
    the next run)."""
    conn = await asyncpg.connect(database_url)
    try:
        monday = period_start(datetime.now(UTC) + timedelta(days=70), "week")
        wednesday = monday + timedelta(days=2)
        assert await ensure(conn, "day", now=wednesday, ahead=0) == [suffix(wednesday)]
        rows = {when: await insert_pair(conn, when) for when in (
            monday + timedelta(hours=3), monday + timedelta(days=4, hours=5),
            monday + timedelta(days=6, hours=1), monday + timedelta(weeks=3, hours=2))}
        assert {s for rid in rows.values() for s in await where(conn, rid)} == {"default"}
        created = await ensure(conn, "week")  # and the weeks ahead of now, before these
        starts = [monday, wednesday + timedelta(days=1), monday + timedelta(weeks=3)]
        assert [c for c in created if c >= suffix(monday)] == [suffix(s) for s in starts]
        for when, rid in rows.items():
            assert await where(conn, rid) == {suffix(max(s for s in starts if s <= when))}
        for table in ("requests", "responses"):
            assert await conn.fetchval(f"SELECT count(*) FROM shadowproxy.{table}_default") == 0
        assert await ensure(conn, "week") == []
    finally:
        await conn.close()


async def test_a_row_at_minus_infinity_holds_no_other_row_in_default(database_url: str) -> None:
    """A row at -infinity stays in DEFAULT (no partition can take it); the rows after it
    still get their partitions. It was the earliest row found, and ended the search."""
    conn = await asyncpg.connect(database_url)
    try:
        far = period_start(datetime.now(UTC) + timedelta(days=90), "day") + timedelta(hours=3)
        rid = await insert_pair(conn, far)
        never = uuid.uuid4()
        await conn.execute(
            "INSERT INTO shadowproxy.requests (id, request_id, route, received_at, method, "
            "path) VALUES ($1, 'never', 'r', '-infinity', 'GET', '/')", never)
        await conn.execute(
            "INSERT INTO shadowproxy.responses (request, target, role, status, received_at) "
            "VALUES ($1, 'primary', 'primary', 200, '-infinity')", never)
        assert suffix(period_start(far, "day")) in await ensure(conn, "day")
        assert await where(conn, rid) == {suffix(period_start(far, "day"))}
        assert await where(conn, never) == {"default"}
    finally:
        await conn.close()
