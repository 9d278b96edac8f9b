"""Per-minute aggregates of settled hours: the report's exact counts without reading every pair.

The report's counts and rates (requests, pairs, statuses, outcomes, latency means and
extremes) are exact over the whole window, however large. Read from the rows, they cost a
pass over every pair of the window; read from ``pair_rollups`` and ``request_rollups``
(migration 006), a few rows per minute. Those are made here, one hour at a time, by the
proxy's maintenance task (``roll_up``) for hours that ended at least ``SETTLE`` ago: by then
every live record of the hour has been written (a record is written when its last upstream
call ends, within the calls' timeouts, and the recorder's batches follow within a second).

What arrives in an hour after it was summarized makes the summary wrong, so it is removed in
the transaction that writes it: a spooled batch replayed after an outage, answers stored by
``shadowproxy replay`` (``invalidate``, called by the recorder's writer for every batch
that holds a record of an hour that may have been summarized, ``WRITE_MARGIN``), and
``prune`` removes the summaries of what it removes before or as it removes it
(``forget_before``, ``forget_range``). The hour is then summarized again by the next
maintenance run. ``ROLLUP_LOCK`` orders the two: a transaction
summarizing an hour and one writing late rows into it never overlap, so a summary either
counts the late rows or is deleted by their writer. Only such batches wait for that lock,
never a live one. No hour is summarized while an upgrade's legacy tables are still being
moved into the partitioned ones (their rows arrive in old hours without a writer's check).

With each hour go its requests' smallest sampling keys for the report's default seed
(``sample_keys``, at most ``SAMPLE_KEYS`` per route, and ``sample_key_limits``: where they
end): the report's default sample of a window is the requests with the smallest keys, and
those of summarized hours are among the kept ones (``compare/sampling.py``), so the draw
reads them instead of every request of the window.

The report (``compare/operational.py``) reads the summaries for the minutes of summarized
hours inside its window and the rows for the rest (the window's partial minutes at both
ends, and hours not summarized yet), with the same grouping (``PAIR_GROUPS``), and adds
them up.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from shadowproxy.compare.options import DEFAULT_MAX_PAIRS, DEFAULT_SEED

HOUR = timedelta(hours=1)
SETTLE = timedelta(minutes=15)
"""An hour is summarized once it ended this long ago."""
WRITE_MARGIN = timedelta(minutes=1)
"""A record whose hour ended at least ``SETTLE - WRITE_MARGIN`` before it is written may fall
in a summarized hour: its writer removes that hour's summary. Any later hour cannot have
been summarized yet and is not summarized before the write commits (a write gives up after
15 s; the rest of the margin covers a proxy's clock running behind the database's). So a
live batch never looks at the summaries, not even with a record of a long streamed answer,
and only spooled batches of earlier hours and replayed answers do."""
ROLLUP_LOCK = 0x5AD0_0000_0003
"""Transaction-level advisory lock taken by whoever summarizes an hour or invalidates one."""
ISOLATION = "read_committed"
"""The isolation of the transactions that take ``ROLLUP_LOCK``, whatever the database's
``default_transaction_isolation``: each statement after the lock must see what the
transaction it waited for committed. Under REPEATABLE READ the snapshot is taken by the
statement that waits for the lock, so a summary missed the late rows of the writer it
waited for, and a writer's ``invalidate`` missed the summary made while it waited."""

COMPARABLE = ("primary_status BETWEEN 200 AND 299 AND shadow_status BETWEEN 200 AND 299 "
              "AND primary_body_json IS NOT NULL AND shadow_body_json IS NOT NULL")
"""Pairs whose responses can be compared: both 2xx with JSON bodies."""

PAIR_KEYS = ("ps", "ss", "po", "so", "sek", "replayed", "comparable")
PAIR_GROUPS = f"""
    primary_status AS ps, shadow_status AS ss,
    coalesce(primary_error_kind, CASE WHEN primary_status IS NOT NULL THEN 'ok' END) AS po,
    coalesce(shadow_error_kind, CASE WHEN shadow_status IS NOT NULL THEN 'ok' END) AS so,
    shadow_error_kind AS sek, shadow_role = 'replay' AS replayed,
    coalesce({COMPARABLE}, false) AS comparable"""
"""The keys the report's counts and rates tell pairs apart by, over ``shadowproxy.pairs``."""
PAIR_SUMS = """
    count(*) AS n,
    count(primary_latency_ms) AS pn, sum(primary_latency_ms) AS psum,
    min(primary_latency_ms) AS pmin, max(primary_latency_ms) AS pmax,
    count(shadow_latency_ms) AS sn, sum(shadow_latency_ms) AS ssum,
    min(shadow_latency_ms) AS smin, max(shadow_latency_ms) AS smax"""
"""Each group's size and latency sums, over ``shadowproxy.pairs``."""
ROLLED_SUMS = """
    sum(n) AS n, sum(pn) AS pn, sum(psum) AS psum, min(pmin) AS pmin, max(pmax) AS pmax,
    sum(sn) AS sn, sum(ssum) AS ssum, min(smin) AS smin, max(smax) AS smax"""
"""The same, over ``pair_rollups`` rows of one group."""

SAMPLE_SEED = DEFAULT_SEED
"""The report's default seed: the one whose sample keys are kept (``sample_keys``)."""
SAMPLE_KEYS = DEFAULT_MAX_PAIRS
"""Keys kept per hour and route: a default sample (``--max-pairs``) of any window of
summarized hours is among them."""
SAMPLE_KEY = "hashtextextended(id::text, {seed})"
"""A request's sampling key (``compare/sampling.py`` draws the smallest)."""

_MINUTE = "to_timestamp(floor(extract(epoch FROM received_at) / 60) * 60)"

_ROLL_PAIRS = f"""
INSERT INTO shadowproxy.pair_rollups
    (hour, minute, route, shadow_name, config_version, {", ".join(PAIR_KEYS)},
     n, pn, psum, pmin, pmax, sn, ssum, smin, smax)
SELECT $1::timestamptz, {_MINUTE}, route, shadow_name, config_version, {PAIR_GROUPS}, {PAIR_SUMS}
FROM shadowproxy.pairs WHERE received_at >= $1 AND received_at < $2
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12"""

_ROLL_REQUESTS = f"""
INSERT INTO shadowproxy.request_rollups
    (hour, minute, route, config_version, requests, first_at, last_at)
SELECT $1::timestamptz, {_MINUTE}, route, config_version,
       count(*), min(received_at), max(received_at)
FROM shadowproxy.requests WHERE received_at >= $1 AND received_at < $2
GROUP BY 1, 2, 3, 4"""


_KEEP_KEYS = f"""
INSERT INTO shadowproxy.sample_keys (hour, route, k, id, received_at)
SELECT $1::timestamptz, route, k, id, received_at FROM (
    SELECT route, id, received_at, {SAMPLE_KEY.format(seed=SAMPLE_SEED)} AS k,
           row_number() OVER (PARTITION BY route
                              ORDER BY {SAMPLE_KEY.format(seed=SAMPLE_SEED)}, id) AS rn
    FROM shadowproxy.requests WHERE received_at >= $1 AND received_at < $2) r
WHERE rn <= $3"""

_KEY_LIMITS = """
INSERT INTO shadowproxy.sample_key_limits (hour, route, kept, complete, last_k)
SELECT k.hour, k.route, count(*), count(*) = r.requests, max(k.k)
FROM shadowproxy.sample_keys k
JOIN (SELECT route, sum(requests) AS requests FROM shadowproxy.request_rollups
      WHERE hour = $1 GROUP BY route) r ON r.route = k.route
WHERE k.hour = $1 GROUP BY k.hour, k.route, r.requests"""


@dataclass(frozen=True)
class Rolled:
    """What one ``roll_up`` did: the hours summarized, and whether some were left for later."""

    hours: int = 0
    requests: int = 0
    more: bool = False


def hour_of(at: datetime) -> datetime:
    """The start of the hour (on the Unix epoch's hours) that ``at`` falls in."""
    seconds = at.timestamp()
    return datetime.fromtimestamp(seconds - seconds % 3600, UTC)


async def roll_up_hour(conn: asyncpg.Connection, hour: datetime) -> int:
    """Summarize one hour (again, if it was); returns its requests."""
    async with conn.transaction(isolation=ISOLATION):
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ROLLUP_LOCK)
        await conn.execute("DELETE FROM shadowproxy.rollup_hours WHERE hour = $1", hour)
        requests = await conn.fetchval(
            "SELECT count(*) FROM shadowproxy.requests WHERE received_at >= $1 "
            "AND received_at < $2", hour, hour + HOUR)
        await conn.execute("INSERT INTO shadowproxy.rollup_hours (hour, requests) "
                           "VALUES ($1, $2)", hour, requests)
        if requests:
            await conn.execute(_ROLL_REQUESTS, hour, hour + HOUR)
            await conn.execute(_ROLL_PAIRS, hour, hour + HOUR)
            await conn.execute(_KEEP_KEYS, hour, hour + HOUR, SAMPLE_KEYS)
            await conn.execute(_KEY_LIMITS, hour)
    return int(requests)


async def roll_up(conn: asyncpg.Connection, *, max_hours: int | None = None,
                  budget_s: float | None = None) -> Rolled:
    """Summarize the settled hours that are not, oldest first: at most ``max_hours`` of
    them, and no new one once ``budget_s`` have passed (the rest at the next call). Hours
    without a request are marked summarized too, so that they are not looked at again."""
    if await conn.fetchval("SELECT to_regclass('shadowproxy.requests_legacy') IS NOT NULL"):
        return Rolled(more=True)  # the upgrade's move is not over: hours are still filling
    # A row at ±infinity is in no hour (migrate leaves it in DEFAULT): the oldest that was,
    # -infinity, failed every run (asyncpg gives it as a naive year 1, no hour of it).
    oldest = await conn.fetchval("SELECT min(received_at) FROM shadowproxy.requests "
                                 "WHERE isfinite(received_at)")
    if oldest is None:
        return Rolled()
    now = await conn.fetchval("SELECT now()")
    last = hour_of(now - SETTLE) - HOUR  # the last hour that ended SETTLE ago or more
    first = hour_of(oldest)
    if first > last:
        return Rolled()
    done = {r[0] for r in await conn.fetch(
        "SELECT hour FROM shadowproxy.rollup_hours WHERE hour >= $1 AND hour <= $2",
        first, last)}
    todo = []
    hour = first
    while hour <= last:
        if hour not in done:
            todo.append(hour)
        hour += HOUR
    limit = len(todo) if max_hours is None else max_hours
    requests = done_hours = 0
    started = time.monotonic()
    for hour in todo:
        over_budget = budget_s is not None and time.monotonic() - started > budget_s
        if done_hours >= limit or (done_hours and over_budget):
            return Rolled(hours=done_hours, requests=requests, more=True)
        requests += await roll_up_hour(conn, hour)
        done_hours += 1
    return Rolled(hours=done_hours, requests=requests)


def may_be_summarized(received: float, now: float) -> bool:
    """Whether the hour of a record received at ``received`` (Unix seconds) may have been
    summarized by ``now``."""
    return received - received % 3600 + 3600 <= now - (SETTLE - WRITE_MARGIN).total_seconds()


def late_hours(received: Iterable[float | datetime], now: float | None = None
               ) -> list[datetime]:
    """The hours of the records in ``received`` (Unix seconds, or aware datetimes of older
    spool files) that may have been summarized already (``WRITE_MARGIN``)."""
    at_now = time.time() if now is None else now
    hours: set[float] = set()
    for at in received:
        seconds = at.timestamp() if isinstance(at, datetime) else at
        if may_be_summarized(seconds, at_now):
            hours.add(seconds - seconds % 3600)
    return [datetime.fromtimestamp(h, UTC) for h in sorted(hours)]


async def invalidate(conn: asyncpg.Connection, hours: list[datetime]) -> None:
    """Remove the summaries of ``hours``, in the caller's transaction (which writes rows
    into them, at ``ISOLATION``): they are made again, with those rows, by the next
    maintenance run."""
    if hours:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ROLLUP_LOCK)
        await conn.execute("DELETE FROM shadowproxy.rollup_hours WHERE hour = ANY($1)", hours)


async def forget_before(conn: asyncpg.Connection, cutoff: datetime) -> None:
    """Remove the summaries of every hour that starts before ``cutoff`` (records before it
    were pruned; an hour across it is summarized again from what is left)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ROLLUP_LOCK)
        await conn.execute("DELETE FROM shadowproxy.rollup_hours WHERE hour < $1", cutoff)


async def forget_range(conn: asyncpg.Connection, start: datetime, end: datetime) -> None:
    """Remove the summaries of every hour that overlaps [start, end), in the caller's
    transaction, which drops that range's records (``prune``). Without ``ROLLUP_LOCK``:
    that transaction holds both tables, so no late batch is being written meanwhile, and
    no summary is being made (the caller holds the maintenance lock); taken after the
    tables, the lock could close a cycle with a summary that waits for them."""
    await conn.execute("DELETE FROM shadowproxy.rollup_hours WHERE hour > $1 AND hour < $2",
                       start - HOUR, end)
