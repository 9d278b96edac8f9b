"""Retention: ``shadowproxy prune -c FILE --older-than 30d`` drops whole time partitions.

Every partition of ``requests`` whose range ends at or before the cutoff is detached and
dropped together with its twin of ``responses`` (one short transaction per range: DETACH
PARTITION and DROP TABLE hold an ACCESS EXCLUSIVE lock on both parent tables, for
milliseconds, after waiting at most ``partitions.LOCK_TIMEOUT`` for queries on them to end,
taken by ``partitions.lock_both``; a range whose locks cannot be had fails the command, and
the maintenance task leaves it for its next run). Only what is left before the
cutoff, in the one partition that straddles it and in the DEFAULT partitions, is deleted
row by row: in batches, each one short transaction that picks the oldest requests before
the cutoff, deletes their responses and then the requests themselves; rows another
transaction has locked are skipped rather than waited for, and the recorder keeps writing
throughout. The cutoff is computed once, on the database's clock, so a long prune does not
chase the present. ``storage.retention`` has the running proxy drop the partitions past it
on its own (``store/maintenance.py``), whole partitions only: row-by-row deletes, the cost
partitioning avoids, stay with this command.

Labels (``shadowproxy.labels``) are the user's own data, keyed by request id and not
partitioned: prune leaves them alone (docs/operations.md shows the SQL that removes the
labels of requests no longer stored).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import asyncpg

from shadowproxy.durations import parse_age as _parse_age
from shadowproxy.errors import DatabaseError, UsageError
from shadowproxy.store import legacy, rollups
from shadowproxy.store.database import CONNECTION_ERRORS, connection, describe, reason
from shadowproxy.store.partitions import (
    LOCK_TIMEOUT,
    MAINTENANCE_LOCK,
    Partition,
    lock_both,
    lock_maintenance,
    partitions,
)

# Both deletes see the same snapshot of `doomed`, so a request and its responses go together;
# `received_at < $1` on each table keeps the statement to the partitions before the cutoff.
# SKIP LOCKED: a row some other transaction holds is left for the next run, never waited on.
_DELETE_BATCH = """
WITH doomed AS (
    SELECT id, received_at FROM shadowproxy.requests
    WHERE received_at < $1
    ORDER BY received_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone_responses AS (
    DELETE FROM shadowproxy.responses r USING doomed d
    WHERE r.received_at < $1 AND r.request = d.id AND r.received_at = d.received_at
    RETURNING 1
), gone_requests AS (
    DELETE FROM shadowproxy.requests q USING doomed d
    WHERE q.received_at < $1 AND q.id = d.id AND q.received_at = d.received_at
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone_requests) AS requests,
       (SELECT count(*) FROM gone_responses) AS responses
"""

# Responses before the cutoff whose request is gone already (pruned while they were being
# written, or stored on their own).
_DELETE_ORPHANS = """
WITH doomed AS (
    SELECT request, target, received_at FROM shadowproxy.responses r
    WHERE received_at < $1 AND NOT EXISTS (
        SELECT 1 FROM shadowproxy.requests q
        WHERE q.id = r.request AND q.received_at = r.received_at)
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM shadowproxy.responses r USING doomed d
WHERE r.received_at < $1 AND r.request = d.request AND r.target = d.target
  AND r.received_at = d.received_at
"""


async def cutoff_before(conn: asyncpg.Connection, age: timedelta) -> datetime:
    """``age`` before now, on the database's clock, counted in seconds: a day of an age is
    24 hours. (``now() - interval '30 days'`` counts calendar days of the session's time
    zone, an hour more or less across a change of its clocks; a timedelta of hours is sent
    as days too.)"""
    cutoff: datetime = await conn.fetchval("SELECT now() - make_interval(secs => $1)",
                                           age.total_seconds())
    return cutoff


def parse_age(text: str) -> timedelta:
    """``--older-than 30d`` → 30 days; UsageError, with an example, for anything else."""
    try:
        return _parse_age(text)
    except ValueError as exc:
        raise UsageError(f"--older-than: {exc}") from exc


@dataclass(frozen=True)
class PruneResult:
    """How much one prune removed, and from before when."""

    cutoff: datetime
    requests: int
    """Requests removed: those of the dropped partitions and those deleted one by one."""
    responses: int
    batches: int
    """Batches of the row-by-row delete."""
    dropped: list[str] = field(default_factory=list)
    """The dropped partitions, by name suffix (``partitions.suffix``)."""
    estimated: bool = False
    """True when the dropped partitions' rows are PostgreSQL's estimate (a partition that
    was analyzed), not a count."""


async def _size(conn: asyncpg.Connection, part: Partition | None) -> tuple[int, bool]:
    """Rows of a partition about to be dropped: the planner's estimate when it has one (a
    count would read the whole partition, the very cost a drop avoids), else a count."""
    if part is None:
        return 0, False
    if part.estimate >= 0:
        return part.estimate, True
    return await conn.fetchval(f"SELECT count(*) FROM shadowproxy.{part.name}"), False


async def drop_partitions(conn: asyncpg.Connection, cutoff: datetime
                          ) -> tuple[list[str], int, int, bool]:
    """Detach and drop the partitions (of both tables) that end at or before ``cutoff``,
    each range with the summaries of its hours (``rollups.forget_range``): (suffixes
    dropped, requests, responses, estimated)."""
    answers = {p.name.removeprefix("responses_"): p for p in await partitions(conn, "responses")}
    dropped: list[str] = []
    requests = responses = 0
    estimated = False
    for part in await partitions(conn, "requests"):
        if part.end > cutoff:
            break
        name = part.name.removeprefix("requests_")
        twin = answers.get(name)
        n_requests, est_q = await _size(conn, part)
        n_responses, est_r = await _size(conn, twin)
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            if twin is not None:  # DETACH's locks on both tables, taken without a deadlock
                await lock_both(conn, "ONLY shadowproxy.requests", "ONLY shadowproxy.responses")
            await conn.execute(f"ALTER TABLE shadowproxy.requests DETACH PARTITION "
                               f"shadowproxy.{part.name}")
            await conn.execute(f"DROP TABLE shadowproxy.{part.name}")
            if twin is not None:
                await conn.execute(f"ALTER TABLE shadowproxy.responses DETACH PARTITION "
                                   f"shadowproxy.{twin.name}")
                await conn.execute(f"DROP TABLE shadowproxy.{twin.name}")
            await rollups.forget_range(conn, part.start, part.end)
        dropped.append(name)
        requests += n_requests
        responses += n_responses
        estimated = estimated or est_q or est_r
    # A responses partition without a twin (made by hand, say) goes by its own range.
    for name, twin in answers.items():
        if twin.end <= cutoff and name not in dropped:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                n_responses, est_r = await _size(conn, twin)
                await conn.execute(f"ALTER TABLE shadowproxy.responses DETACH PARTITION "
                                   f"shadowproxy.{twin.name}")
                await conn.execute(f"DROP TABLE shadowproxy.{twin.name}")
                await rollups.forget_range(conn, twin.start, twin.end)
            responses += n_responses
            estimated = estimated or est_r
    return dropped, requests, responses, estimated


async def prune_before(conn: asyncpg.Connection, cutoff: datetime, *,
                       batch_size: int = 5000, whole_partitions: bool = False) -> PruneResult:
    """Remove every record received before ``cutoff``: whole partitions, then what is left
    in the partition that straddles the cutoff and in DEFAULT, in batches (with
    ``whole_partitions``, the partitions only). The caller holds ``MAINTENANCE_LOCK``.

    The summaries of what is removed go first, or with it, never after it: a prune cut
    short (a lock not had, the connection lost) leaves no summary of records it removed,
    which the report would go on counting. Each dropped range takes its hours' summaries
    along in its own transaction; with the row-by-row delete, every hour before the cutoff
    is forgotten before the first batch (none is made again meanwhile: summaries are made
    by the maintenance task, under ``MAINTENANCE_LOCK``), and the next maintenance run
    summarizes what is left. With whole partitions only, the hours of the partition across
    the cutoff keep their records, so they keep their summaries (forgotten, they would be
    summarized again at every run, ahead of the new hours)."""
    dropped, requests, responses, estimated = await drop_partitions(conn, cutoff)
    if not whole_partitions:
        await rollups.forget_before(conn, cutoff)
    batches = 0
    while not whole_partitions:
        row = await conn.fetchrow(_DELETE_BATCH, cutoff, batch_size)
        assert row is not None  # an aggregate SELECT always returns one row
        if row["requests"] == 0:
            break
        requests += row["requests"]
        responses += row["responses"]
        batches += 1
    while not whole_partitions:
        status = await conn.execute(_DELETE_ORPHANS, cutoff, batch_size)
        gone = int(status.split()[-1])
        if gone == 0:
            break
        responses += gone
    return PruneResult(cutoff=cutoff, requests=requests, responses=responses, batches=batches,
                       dropped=dropped, estimated=estimated)


async def prune(url: str, older_than: timedelta, *, batch_size: int = 5000) -> PruneResult:
    """Remove requests received more than ``older_than`` ago, and their responses."""
    if batch_size < 1:
        raise UsageError(f"--batch-size: expected 1 or more (got {batch_size})")
    async with connection(url) as conn:
        try:
            if await conn.fetchval("SELECT to_regclass('shadowproxy.requests')") is None:
                raise DatabaseError(
                    f"the database at {describe(url)} has no shadowproxy tables; "
                    "run `shadowproxy migrate -c FILE` first (or check database.url)")
            if await legacy.pending(conn) or await conn.fetchval(
                    "SELECT relkind <> 'p' FROM pg_class "
                    "WHERE oid = 'shadowproxy.requests'::regclass"):
                raise DatabaseError(
                    f"the database at {describe(url)} is not fully upgraded to partitioned "
                    "tables; run `shadowproxy migrate -c FILE` first")
            cutoff = await cutoff_before(conn, older_than)
            await lock_maintenance(conn)
            try:
                return await prune_before(conn, cutoff, batch_size=batch_size)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise DatabaseError(f"prune failed on {describe(url)}: {reason(exc)}") from exc


def run_prune(args: argparse.Namespace) -> int:
    """The ``prune`` command: validate the arguments, prune, say how much went."""
    from shadowproxy.config import load_config
    from shadowproxy.runner import run_command
    from shadowproxy.store.database import database_url

    older_than = parse_age(args.older_than)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: expected 1 or more (got {args.batch_size})")
    settings = load_config(args.config)
    url = database_url(settings)
    result = run_command(prune(url, older_than, batch_size=args.batch_size), interrupted=(
        "each partition dropped and each batch of rows deleted is its own transaction: "
        "what was removed stays removed, the batch under way was rolled back; run "
        "`shadowproxy prune` again to finish"))
    print(describe_result(result, describe(url)))
    return 0


def describe_result(result: PruneResult, where: str) -> str:
    """One line saying what a prune removed."""
    when = result.cutoff.isoformat(timespec="seconds")
    if result.requests == 0 and result.responses == 0 and not result.dropped:
        return f"nothing to prune: no requests received before {when} ({where})"
    about = "about " if result.estimated else ""
    parts = f"{len(result.dropped)} partition(s) dropped"
    if result.dropped:
        parts += f" ({result.dropped[0]}" + (
            f" to {result.dropped[-1]})" if len(result.dropped) > 1 else ")")
    return (f"pruned {about}{result.requests} requests and {about}{result.responses} "
            f"responses received before {when}: {parts}, {result.batches} batch(es) deleted "
            f"from the partition across the cutoff ({where})")
