"""Retention: prune deletes old requests and their responses, in batches, on real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from shadowproxy.errors import DatabaseError, UsageError
from shadowproxy.store.prune import parse_age, prune


async def _insert(conn: asyncpg.Connection, age: timedelta, shadows: int = 1) -> uuid.UUID:
    """One request received `age` ago, with a primary response and `shadows` shadow ones."""
    rid = uuid.uuid4()
    when = await conn.fetchval("SELECT now() - $1::interval", age)
    await conn.execute(
        "INSERT INTO shadowproxy.requests (id, request_id, route, received_at, method, path) "
        "VALUES ($1, $2, 'r', $3, 'POST', '/predict')", rid, str(rid), when)
    targets = [("primary", "primary")] + [(f"s{i}", "shadow") for i in range(shadows)]
    await conn.executemany(
        "INSERT INTO shadowproxy.responses (request, target, role, status, started_at, "
        "received_at) VALUES ($1, $2, $3, 200, $4, $4)",
        [(rid, target, role, when) for target, role in targets])
    return rid


async def _ids(conn: asyncpg.Connection) -> tuple[set[uuid.UUID], set[uuid.UUID]]:
    requests = {r["id"] for r in await conn.fetch("SELECT id FROM shadowproxy.requests")}
    responses = {r["request"]
                 for r in await conn.fetch("SELECT request FROM shadowproxy.responses")}
    return requests, responses


async def test_prune_removes_old_requests_and_their_responses(database_url: str) -> None:
    """Requests older than the age go with all their responses; younger ones stay whole."""
    conn = await asyncpg.connect(database_url)
    try:
        old = [await _insert(conn, timedelta(days=d), shadows=2) for d in (31, 45, 400)]
        young = [await _insert(conn, timedelta(days=d)) for d in (0, 1, 29)]
        result = await prune(database_url, timedelta(days=30))
        requests, responses = await _ids(conn)
    finally:
        await conn.close()
    assert (result.requests, result.responses) == (3, 9)
    assert requests == responses == set(young)
    assert not set(old) & requests


async def test_prune_works_in_batches_until_done(database_url: str) -> None:
    """A batch size smaller than the backlog takes several batches and still removes it all."""
    conn = await asyncpg.connect(database_url)
    try:
        for _ in range(10):
            await _insert(conn, timedelta(hours=2))
        keep = await _insert(conn, timedelta(minutes=5))
        result = await prune(database_url, timedelta(hours=1), batch_size=3)
        requests, responses = await _ids(conn)
    finally:
        await conn.close()
    assert (result.requests, result.responses, result.batches) == (10, 20, 4)
    assert requests == responses == {keep}


async def test_prune_skips_rows_another_transaction_holds(database_url: str) -> None:
    """A request locked by another transaction is skipped, not waited on; the rest go."""
    conn = await asyncpg.connect(database_url)
    locker = await asyncpg.connect(database_url)
    try:
        held = await _insert(conn, timedelta(days=10))
        await _insert(conn, timedelta(days=10))
        tx = locker.transaction()
        await tx.start()
        await locker.execute("SELECT 1 FROM shadowproxy.requests WHERE id = $1 FOR UPDATE", held)
        result = await prune(database_url, timedelta(days=1))
        await tx.rollback()
        requests, _ = await _ids(conn)
    finally:
        await locker.close()
        await conn.close()
    assert result.requests == 1
    assert requests == {held}


async def test_prune_with_nothing_old_removes_nothing(database_url: str) -> None:
    """With no request past the age, prune reports zero and deletes nothing."""
    conn = await asyncpg.connect(database_url)
    try:
        rid = await _insert(conn, timedelta(hours=1))
        result = await prune(database_url, timedelta(days=1))
        requests, _ = await _ids(conn)
    finally:
        await conn.close()
    assert (result.requests, result.responses, result.batches) == (0, 0, 0)
    assert requests == {rid}


async def test_prune_on_an_unmigrated_database_says_to_migrate(empty_database_url: str) -> None:
    """A database without the schema is a DatabaseError that names `shadowproxy migrate`."""
    with pytest.raises(DatabaseError, match="shadowproxy migrate"):
        await prune(empty_database_url, timedelta(days=1))


async def test_prune_refuses_a_batch_size_below_one(database_url: str) -> None:
    """A batch size of 0 is a usage error, not an endless loop."""
    with pytest.raises(UsageError, match="--batch-size"):
        await prune(database_url, timedelta(days=1), batch_size=0)


@pytest.mark.parametrize(("text", "expected"), [
    ("30d", timedelta(days=30)), ("12h", timedelta(hours=12)), ("90m", timedelta(minutes=90)),
    ("45s", timedelta(seconds=45)), ("2w", timedelta(weeks=2)),
])
def test_parse_age_reads_a_number_and_a_unit(text: str, expected: timedelta) -> None:
    """Ages are a whole number followed by s, m, h, d or w."""
    assert parse_age(text) == expected


@pytest.mark.parametrize("text", ["30", "d", "-1d", "0d", "30 days", "1.5d", "30y", ""])
def test_parse_age_refuses_anything_else_with_an_example(text: str) -> None:
    """A malformed or zero age is a UsageError that shows a valid example."""
    with pytest.raises(UsageError, match=r"e\.g\. 30d"):
        parse_age(text)


def _config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"data_dir: {tmp_path / 'data'}\n"
        f"database: {{url: \"{url}\"}}\n"
        "routes:\n"
        "  - name: r\n"
        "    primary: {url: \"http://127.0.0.1:9\"}\n")
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SHADOWPROXY_DATABASE_URL"}
    return subprocess.run([sys.executable, "-m", "shadowproxy", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_prune_command_says_how_many_it_removed(sync_database_url: str, tmp_path: Path) -> None:
    """`shadowproxy prune` exits 0 and prints the number of requests and responses removed."""
    import asyncio

    async def seed() -> None:
        conn = await asyncpg.connect(sync_database_url)
        try:
            for _ in range(3):
                await _insert(conn, timedelta(days=40))
            await _insert(conn, timedelta(days=1))
        finally:
            await conn.close()

    asyncio.run(seed())
    config = _config(tmp_path, sync_database_url)
    proc = _cli("prune", "-c", str(config), "--older-than", "30d", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    assert "pruned 3 requests and 6 responses" in proc.stdout
    again = _cli("prune", "-c", str(config), "--older-than", "30d")
    assert again.returncode == 0, again.stderr
    assert "nothing to prune" in again.stdout


@pytest.mark.parametrize(("args", "expected"), [
    (["--older-than", "30 days"], "e.g. 30d"),
    (["--older-than", "30d", "--batch-size", "0"], "--batch-size: expected 1 or more"),
    (["--older-than", "99999999999d"], "--older-than: too large an age"),
    (["--older-than", "3000000d"], "--older-than: too large an age: at most 36525d"),
    # argparse took `-1d` for an option: "expected one argument"
    (["--older-than", "-1d"], "--older-than: a negative age makes no sense: an age counts "
                              "back from now (for records from before 1d ago, write 1d)"),
    (["--older-than=-1d", "--batch-size", "2"], "--older-than: a negative age makes no sense"),
    (["--batch-size", "2", "--older-than", "-30m"], "(for records from before 30m ago"),
])
def test_prune_command_with_bad_arguments_exits_2(
        tmp_path: Path, args: list[str], expected: str) -> None:
    """Bad --older-than or --batch-size values exit 2 before touching any database."""
    config = _config(tmp_path, "postgresql://nobody@127.0.0.1:1/none")
    proc = _cli("prune", "-c", str(config), *args)
    assert proc.returncode == 2
    assert expected in proc.stderr


def _clock_moved_forward() -> tuple[str, int]:
    """A time zone with daylight saving time and a number of days such that its clocks were
    put forward between that many days ago and now (Berlin's summer time and Sydney's
    cover the whole year between them)."""
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    now = datetime.now(UTC)
    for name in ("Europe/Berlin", "Australia/Sydney"):
        zone = ZoneInfo(name)
        offset = now.astimezone(zone).utcoffset()
        for days in range(1, 400):
            before = (now - timedelta(days=days)).astimezone(zone).utcoffset()
            if offset is not None and before is not None and before < offset:
                return name, days
    raise AssertionError("no clock change found")


async def test_an_age_in_days_is_exact_in_a_time_zone_with_summer_time(
        database_url: str) -> None:
    """A day of an age is 24 hours, also when the database's time zone put its clocks
    forward within the age (calendar days there are an hour shorter): prune keeps a record
    received 20 minutes less than the age ago and removes one 20 minutes more; the
    retention cuts at the same time."""
    from shadowproxy.config import StorageConfig
    from shadowproxy.store.maintenance import run_once

    zone, days = _clock_moved_forward()
    age = timedelta(days=days)
    conn = await asyncpg.connect(database_url)
    try:
        name = await conn.fetchval("SELECT current_database()")
        # For the sessions to come: this one keeps UTC, so the records' times are exact.
        await conn.execute(f"ALTER DATABASE \"{name}\" SET TimeZone = '{zone}'")
        keep = await _insert(conn, age - timedelta(minutes=20))
        await _insert(conn, age + timedelta(minutes=20))
        result = await prune(database_url, age)
        assert await _ids(conn) == ({keep}, {keep})
        assert result.requests == 1
        before = await conn.fetchval("SELECT now()")
        outcome = await run_once(database_url, StorageConfig(retention=f"{days}d"))
        after = await conn.fetchval("SELECT now()")
    finally:
        await conn.close()
    assert outcome.pruned is not None
    assert before - age <= outcome.pruned.cutoff <= after - age  # the same cutoff


# --- by partition ---------------------------------------------------------------------------

async def test_prune_drops_whole_partitions_and_deletes_only_across_the_cutoff(
        database_url: str) -> None:
    """Partitions that end before the cutoff are detached and dropped (both tables); in the
    one partition across the cutoff only the rows before it are deleted; later partitions
    and labels are untouched."""
    from shadowproxy.store.partitions import ensure, partitions, period_start, suffix

    conn = await asyncpg.connect(database_url)
    try:
        now = await conn.fetchval("SELECT now()")
        await ensure(conn, "day", now=now - timedelta(days=10), ahead=10)
        # A record at 06:00 of each of the last ten days.
        for days in range(1, 11):
            at = period_start(now - timedelta(days=days), "day") + timedelta(hours=6)
            await _insert(conn, now - at)
        cut_day = period_start(now - timedelta(days=5), "day")
        cutoff = cut_day + timedelta(hours=12)
        early = await _insert(conn, now - (cutoff - timedelta(hours=2)))  # before the cut
        late = await _insert(conn, now - (cutoff + timedelta(hours=2)))  # after it, same day
        await conn.execute("INSERT INTO shadowproxy.labels (request_id, label) VALUES "
                           "($1, '1'), ($2, '2')", str(early), str(late))
        before = {p.name for p in await partitions(conn, "requests")}
        result = await prune(database_url, now - cutoff)
        after = {p.name for p in await partitions(conn, "requests")}
        answers_after = {p.name for p in await partitions(conn, "responses")}
        requests, responses = await _ids(conn)
        labels = await conn.fetchval("SELECT count(*) FROM shadowproxy.labels")
    finally:
        await conn.close()
    gone = {f"requests_{suffix(cut_day - timedelta(days=d))}" for d in range(1, 6)}
    assert gone <= before
    assert before - after == gone
    assert {n.replace("responses_", "requests_") for n in answers_after} == after
    assert sorted(result.dropped) == sorted(n.removeprefix("requests_") for n in gone)
    assert early not in requests and early not in responses
    assert late in requests and late in responses
    # Five dropped days of one record each (two answers each), and in the day across the
    # cutoff the record of 06:00 and `early`, deleted in one batch.
    assert (result.requests, result.responses, result.batches) == (7, 14, 1)
    assert not result.estimated
    assert requests == responses
    assert labels == 2


async def test_prune_refuses_a_database_still_being_upgraded(empty_database_url: str) -> None:
    """While the rows of an upgraded database are not all in the partitioned tables, prune
    says to run migrate instead of pruning half the records."""
    from shadowproxy.store.migrate import apply
    from tests.store.test_migrate import apply_up_to

    conn = await asyncpg.connect(empty_database_url)
    try:
        await apply_up_to(conn, 4)
        await conn.execute(
            "INSERT INTO shadowproxy.requests (id, request_id, route, received_at, method, "
            "path) VALUES (gen_random_uuid(), 'x', 'r', now(), 'POST', '/')")
        await apply(conn)  # the SQL only: the row waits in requests_legacy
    finally:
        await conn.close()
    with pytest.raises(DatabaseError, match="shadowproxy migrate"):
        await prune(empty_database_url, timedelta(days=1))


async def test_a_reader_of_both_tables_and_a_prune_do_not_deadlock(database_url: str) -> None:
    """A reader holding the answers that then reads the requests (as a query over both can
    lock them), while a prune drops a partition: the prune never waits for the answers'
    table while it holds the requests', so neither side ends in "deadlock detected". It
    detached the requests' partition and waited for the answers' table, and PostgreSQL
    broke the cycle by failing one of the two."""
    from shadowproxy.store.partitions import ensure

    conn = await asyncpg.connect(database_url)
    reader = await asyncpg.connect(database_url)
    try:
        now = await conn.fetchval("SELECT now()")
        await ensure(conn, "day", now=now - timedelta(days=10), ahead=10)
        old = await _insert(conn, timedelta(days=8))
        tx = reader.transaction()
        await tx.start()
        await reader.fetchval("SELECT count(*) FROM shadowproxy.responses")
        pruning = asyncio.create_task(prune(database_url, timedelta(days=3)))
        await asyncio.sleep(0.5)  # it waits for, or keeps trying, the answers' table
        assert await reader.fetchval("SELECT count(*) FROM shadowproxy.requests") == 1
        await tx.commit()
        result = await asyncio.wait_for(pruning, 10)
        requests, responses = await _ids(conn)
    finally:
        await reader.close()
        await conn.close()
    assert old not in requests and old not in responses
    assert (result.requests, result.responses) == (1, 2)
