"""Time partitions of ``requests`` and ``responses``: list them, create them ahead of time.

Both tables are partitioned by range of ``received_at`` (migration 005) and always in step:
for each range there is ``requests_pYYYYMMDD`` and ``responses_pYYYYMMDD`` (an hourly
partition, or one that fills a gap, is ``..._pYYYYMMDD_HHMM``, after its start in UTC), plus
``requests_default`` and ``responses_default`` for rows of a time no partition covers yet.

``ensure`` creates the partitions of the current period and of the next ones
(``AHEAD``), and, in the same run, one for every range that has rows in a DEFAULT partition
or in the legacy tables of an upgrade (so that a run leaves DEFAULT empty, but for rows at
±infinity), leaving no gaps and never overlapping a partition that exists (a changed
``storage.partition`` applies from the next free range on). PostgreSQL refuses to
attach a partition whose range has rows in the DEFAULT partition, so each new partition is
built as a plain table, the DEFAULT partition's rows of its range are moved into it, and it
is attached, in one transaction per range: ATTACH PARTITION holds SHARE UPDATE EXCLUSIVE on
the parent table (writers and readers go on) and ACCESS EXCLUSIVE on the DEFAULT partition
(only writes of rows that would land there wait), for as long as the move takes, which is
nothing when the partitions were made ahead as intended.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from shadowproxy.config import PARTITIONS_AHEAD
from shadowproxy.errors import DatabaseError

TABLES = ("requests", "responses")
PERIODS: dict[str, timedelta] = {"hour": timedelta(hours=1), "day": timedelta(days=1),
                                 "week": timedelta(weeks=1)}
AHEAD = PARTITIONS_AHEAD
"""Partitions made after the current one (``config.PARTITIONS_AHEAD``, which bounds
``storage.maintenance_interval_s``)."""
MAINTENANCE_LOCK = 0x5AD0_0000_0002
"""The advisory lock under which one process at a time creates, moves and drops partitions
(``shadowproxy migrate``, ``prune``, and the proxies' maintenance task)."""
MAINTAINERS = ("`shadowproxy migrate` or `prune`, or a proxy's maintenance run (partitions, "
               "retention, summaries, the move of an upgrade)")
"""Who takes ``MAINTENANCE_LOCK``."""
LOCK_TIMEOUT = "5s"
"""How long a maintenance statement waits for a lock before giving up until the next run
(a long report holds the tables; writers must not queue behind the maintenance)."""
LOCK_WAIT_S = 5.0
"""``LOCK_TIMEOUT`` in seconds: how long ``lock_both`` goes on trying."""
LOCK_RETRY_S = 0.05

# A range bound as PostgreSQL prints it: FROM ('2026-12-02 00:00:00+00') TO (...), in the
# session's time zone, so it is read back by PostgreSQL itself (::timestamptz). Printed and
# read in the ISO DateStyle (``partitions`` sets it for the query): a database or role may
# set another (ALTER DATABASE ... SET DateStyle = 'SQL, DMY'), whose text does not always
# read back as the time it printed: 'SQL, YMD' prints 12/06/2026 05:45:00 +0545 and reads
# it as month 6 of year 12, out of range; 'German, MDY' prints 07.12.2026 (day first) and
# reads it as July 12th; before PostgreSQL 18, 'SQL, DMY' or 'Postgres' print the zone's
# abbreviation (CST for Asia/Shanghai), read back as another zone's (Central, -06). The
# listing failed (and with it migrate, prune and maintenance) or gave wrong ranges, and
# ensure made partitions overlapping those there. ISO prints the offset in numbers and is
# read back year first in every DateStyle.
_LIST = r"""
SELECT c.relname AS name,
       CASE WHEN m[1] = 'MINVALUE' THEN '-infinity' ELSE btrim(m[1], '''') END::timestamptz
           AS start,
       CASE WHEN m[2] = 'MAXVALUE' THEN 'infinity' ELSE btrim(m[2], '''') END::timestamptz
           AS "end",
       c.reltuples::bigint AS estimate
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid,
     regexp_match(pg_get_expr(c.relpartbound, c.oid),
                  $re$FROM \((MINVALUE|'[^']*')\) TO \((MAXVALUE|'[^']*')\)$re$) m
WHERE i.inhparent = format('shadowproxy.%I', $1::text)::regclass
  AND m IS NOT NULL
ORDER BY 2
"""


async def lock_maintenance(conn: asyncpg.Connection) -> None:
    """Take ``MAINTENANCE_LOCK`` for the session (a command's: the proxies' maintenance
    tries it instead), waiting as long as the connection waits for a lock
    (``database.LOCK_TIMEOUT_S``); DatabaseError naming who holds it when that is not
    enough: a command waited without end behind a long move of an upgrade."""
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MAINTENANCE_LOCK)
    except asyncpg.LockNotAvailableError as exc:
        holder = await conn.fetchval(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid = ($1::bigint >> 32)::oid AND objid = ($1::bigint & 4294967295)::oid "
            "AND objsubid = 1", MAINTENANCE_LOCK)
        wait = await conn.fetchval("SHOW lock_timeout")
        raise DatabaseError(
            f"another process holds the maintenance lock (PostgreSQL backend "
            f"{holder if holder is not None else '?'}), still after {wait}: {MAINTAINERS} "
            "takes it, one at a time; run the command again once it has finished") from exc


@dataclass(frozen=True)
class Partition:
    """One time partition of a table (DEFAULT excluded), its range half-open."""

    name: str
    start: datetime
    end: datetime
    estimate: int
    """PostgreSQL's estimate of its rows (-1: never analyzed)."""


def period_start(when: datetime, period: str) -> datetime:
    """The start of the period (UTC hour, day, or week from Monday) holding ``when``."""
    t = when.astimezone(UTC)
    if period == "hour":
        return t.replace(minute=0, second=0, microsecond=0)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    return day - timedelta(days=day.weekday())


def suffix(start: datetime) -> str:
    """The part of a partition's name after ``requests_``: ``p20261202``, ``p20261202_1400``."""
    t = start.astimezone(UTC)
    return t.strftime("p%Y%m%d") if t.time() == datetime.min.time() else t.strftime(
        "p%Y%m%d_%H%M")


async def partitions(conn: asyncpg.Connection, table: str = "requests") -> list[Partition]:
    """The time partitions of ``shadowproxy.<table>``, oldest first, whatever the session's
    ``DateStyle`` (see ``_LIST``): another one is set to ISO for the listing and
    set back after it. Not in a transaction of its own: one cut short by a database that
    stops answering would wait for ever on its rollback, past the maintenance's timeout;
    a listing that fails leaves the style ISO (the transaction it failed, if any, rolls it
    back), which only this connection's printed times see."""
    style = await conn.fetchval("SHOW DateStyle")
    if style.startswith("ISO"):  # read back right in any order of day and month
        rows = await conn.fetch(_LIST, table)
    else:
        await conn.execute("SET DateStyle = 'ISO'")  # the output only: the order stays
        rows = await conn.fetch(_LIST, table)
        await conn.execute("SELECT set_config('DateStyle', $1, false)", style)
    return [Partition(r["name"], r["start"], r["end"], r["estimate"]) for r in rows]


def free_range(when: datetime, period: str, existing: list[Partition]
               ) -> tuple[datetime, datetime] | None:
    """The range to create so that ``when`` has a partition: its period, cut short where
    it would overlap a partition that exists; None if one covers ``when`` already."""
    start = period_start(when, period)
    end = start + PERIODS[period]
    for part in existing:
        if part.start <= when < part.end:
            return None
        if part.end <= when:
            start = max(start, part.end)
        elif part.start > when:
            end = min(end, part.start)
    return start, end


async def lock_both(conn: asyncpg.Connection, first: str, second: str) -> None:
    """Take ACCESS EXCLUSIVE locks on the tables ``first`` and ``second`` (the requests'
    one, then the answers'), in the caller's transaction; LockNotAvailableError when they
    were not had within ``LOCK_TIMEOUT``.

    Never waits for ``second`` while holding ``first``: a reader may hold the answers'
    table and then ask for the requests' (a query over both), and PostgreSQL would break
    that cycle by failing one side with "deadlock detected". So ``second`` is asked for
    without waiting, and when another session holds it, ``first`` is given back (the
    savepoint rolled back) and both are tried again after a pause.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LOCK_WAIT_S
    while True:
        left_ms = max(1, int((deadline - loop.time()) * 1000))
        try:
            async with conn.transaction():  # a savepoint: a refusal gives ``first`` back
                # The tries together within LOCK_TIMEOUT, not each of them.
                await conn.execute(f"SET LOCAL lock_timeout = {left_ms}")
                await conn.execute(f"LOCK TABLE {first} IN ACCESS EXCLUSIVE MODE")
                await conn.execute(f"LOCK TABLE {second} IN ACCESS EXCLUSIVE MODE NOWAIT")
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            return
        except asyncpg.LockNotAvailableError:
            if loop.time() >= deadline:
                raise
        await asyncio.sleep(LOCK_RETRY_S)


async def create(conn: asyncpg.Connection, start: datetime, end: datetime) -> str:
    """Create the partitions of [start, end) of both tables, with the rows of that range
    moved out of the DEFAULT partitions and their storage parameters; return the range's
    name suffix."""
    name = suffix(start)
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        # The locks ATTACH takes anyway, taken first: no row of the range can reach a
        # DEFAULT partition between the move and the attach.
        await lock_both(conn, "shadowproxy.requests_default", "shadowproxy.responses_default")
        for table in TABLES:
            part = f"{table}_{name}"
            storage = await _storage_of_default(conn, table)
            await conn.execute(
                f"CREATE TABLE shadowproxy.{part} (LIKE shadowproxy.{table} "
                f"INCLUDING DEFAULTS INCLUDING CONSTRAINTS){storage}")
            await conn.execute(
                f"WITH moved AS (DELETE FROM shadowproxy.{table}_default "
                "WHERE received_at >= $1 AND received_at < $2 RETURNING *) "
                f"INSERT INTO shadowproxy.{part} SELECT * FROM moved", start, end)
            # A CHECK matching the range lets ATTACH skip its scan of the new table.
            await conn.execute(
                f"ALTER TABLE shadowproxy.{part} ADD CONSTRAINT {part}_range CHECK "
                f"(received_at >= '{start.isoformat()}' AND received_at < '{end.isoformat()}')")
            await conn.execute(
                f"ALTER TABLE shadowproxy.{table} ATTACH PARTITION shadowproxy.{part} "
                f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')")
            await conn.execute(f"ALTER TABLE shadowproxy.{part} DROP CONSTRAINT {part}_range")
    return name


async def _storage_of_default(conn: asyncpg.Connection, table: str) -> str:
    """The ``WITH (...)`` clause that gives a new partition the storage parameters of its
    table's DEFAULT partition (``toast_tuple_target = 8160`` unless an operator changed it,
    migration 005), or ``""`` when it has none. PostgreSQL refuses storage parameters on a
    partitioned table, so the DEFAULT partition is where a change to them (docs/sql.md,
    Storage) reaches the partitions made from then on; a fixed setting here undid it."""
    options = await conn.fetchval(
        "SELECT reloptions FROM pg_class WHERE oid = $1::regclass",
        f"shadowproxy.{table}_default")
    if not options:
        return ""
    pairs = (option.split("=", 1) for option in options)
    return " WITH (" + ", ".join(
        f"{name} = '{value.replace(chr(39), chr(39) * 2)}'" for name, value in pairs) + ")"


async def _earliest_waiting(conn: asyncpg.Connection, sources: list[str],
                            after: datetime) -> datetime | None:
    """The earliest ``received_at`` at or after ``after`` in the tables ``sources`` (found
    through their received_at index, so a large table is not scanned), but for ±infinity,
    which no partition can take: None if there is none. (A row at -infinity was the
    earliest, and ended the search: every other row stayed in DEFAULT for good.)"""
    found: list[datetime] = []
    for table in sources:
        when = await conn.fetchval(
            f"SELECT min(received_at) FROM shadowproxy.{table} "
            "WHERE received_at >= $1 AND isfinite(received_at)", after)
        if when is not None:
            found.append(when)
    return min(found, default=None)


async def ensure(conn: asyncpg.Connection, period: str, *, now: datetime | None = None,
                 ahead: int | None = None) -> list[str]:
    """Create the partitions that are missing: the current period's and ``ahead`` more
    (default ``AHEAD[period]``), and every one that rows waiting in a DEFAULT partition or
    in the legacy tables of an upgrade need (one transaction per range). Returns the
    suffixes created, oldest first."""
    if period not in PERIODS:
        raise ValueError(f"unknown partition period {period!r}; expected one of {list(PERIODS)}")
    if now is None:
        now = await conn.fetchval("SELECT now()")
    count = AHEAD[period] if ahead is None else ahead
    created: list[str] = []
    existing = await partitions(conn)
    # From the current period to the end of the last one ahead, every gap is filled (also
    # the gaps left where partitions of another period end).
    when = period_start(now, period)
    horizon = when + PERIODS[period] * (count + 1)
    while when < horizon:
        span = free_range(when, period, existing)
        if span is None:
            when = next(p.end for p in existing if p.start <= when < p.end)
            continue
        created.append(await create(conn, *span))
        existing = await partitions(conn)
        when = span[1]
    sources = ["requests_default", "responses_default"]
    if await conn.fetchval("SELECT to_regclass('shadowproxy.requests_legacy')") is not None:
        sources.append("requests_legacy")
    # The earliest row still waiting is looked up again after each range: a period that a
    # partition of another period cuts in two has rows on both sides, each side needing
    # its own partition (looking once per period left the later side in DEFAULT for the
    # next run).
    after = datetime.min.replace(tzinfo=UTC)
    while (row_at := await _earliest_waiting(conn, sources, after)) is not None:
        span = free_range(row_at, period, existing)
        if span is None:  # a legacy row of a range that has its partition: moved later
            after = next(p.end for p in existing if p.start <= row_at < p.end)
            continue
        created.append(await create(conn, *span))
        existing = await partitions(conn)
        after = span[1]
    return sorted(created)
