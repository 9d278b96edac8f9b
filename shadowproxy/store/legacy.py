"""Moving the records of an upgraded database into the partitioned tables, in batches.

Migration 005 renames the unpartitioned tables of earlier versions to ``requests_legacy``
and ``responses_legacy`` and puts partitioned ones in their place; this module moves the
rows across while the proxy keeps writing to the new tables. Each batch is one transaction
that deletes a few thousand requests (in id order, continuing after the last batch) and
their responses from the legacy tables and inserts them, the responses with their request's
``received_at``, into the partitioned ones: a row is either still in the legacy tables or in
the new ones, never in both and never in neither, whenever the move is interrupted. Once
both legacy tables are empty they are dropped.

Run by ``shadowproxy migrate`` and by the proxy's maintenance task; both create the time
partitions of the legacy rows' periods first (``partitions.ensure``), so the rows land in
their own partition rather than in DEFAULT.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

import asyncpg

from shadowproxy.errors import MigrationError
from shadowproxy.recorder.rows import REQUEST_COLUMNS, RESPONSE_COLUMNS
from shadowproxy.store.partitions import LOCK_TIMEOUT

_REQUESTS = ", ".join(REQUEST_COLUMNS)
_RESPONSES = ", ".join(RESPONSE_COLUMNS)
_RESPONSES_LEGACY = ", ".join(f"r.{c}" for c in RESPONSE_COLUMNS if c != "received_at")

# ON CONFLICT DO NOTHING: a record a spool replay stored again in the new tables (its batch
# was partly stored before the upgrade) is kept once.
_MOVE_BATCH = f"""
WITH batch AS (
    SELECT id FROM shadowproxy.requests_legacy WHERE id > $1 ORDER BY id LIMIT $2
), moved_requests AS (
    DELETE FROM shadowproxy.requests_legacy q USING batch b WHERE q.id = b.id
    RETURNING q.*
), moved_responses AS (
    DELETE FROM shadowproxy.responses_legacy r USING moved_requests q WHERE r.request = q.id
    RETURNING {_RESPONSES_LEGACY}, q.received_at
), put_requests AS (
    INSERT INTO shadowproxy.requests ({_REQUESTS}) SELECT {_REQUESTS} FROM moved_requests
    ON CONFLICT DO NOTHING
), put_responses AS (
    INSERT INTO shadowproxy.responses ({_RESPONSES}) SELECT {_RESPONSES} FROM moved_responses
    ON CONFLICT DO NOTHING
)
SELECT (SELECT id FROM batch ORDER BY id DESC LIMIT 1) AS last,
       (SELECT count(*) FROM moved_requests) AS requests,
       (SELECT count(*) FROM moved_responses) AS responses
"""

# Responses whose request is in neither legacy table (an answer whose request was pruned, or
# stored on its own): their request's received_at if it is in the new table, else their own
# start, else the time of the move.
_MOVE_ORPHANS = f"""
WITH moved AS (
    DELETE FROM shadowproxy.responses_legacy r
    WHERE (r.request, r.target) IN (SELECT request, target FROM shadowproxy.responses_legacy
                                    LIMIT $1)
    RETURNING {_RESPONSES_LEGACY},
              COALESCE((SELECT q.received_at FROM shadowproxy.requests q
                        WHERE q.id = r.request LIMIT 1), r.started_at, now()) AS received_at
), put AS (
    INSERT INTO shadowproxy.responses ({_RESPONSES}) SELECT {_RESPONSES} FROM moved
    ON CONFLICT DO NOTHING
)
SELECT count(*) FROM moved
"""


@dataclass(frozen=True)
class Moved:
    """What one ``move`` did."""

    requests: int
    responses: int
    finished: bool
    """True when the legacy tables are gone (dropped now, or never there)."""


async def pending(conn: asyncpg.Connection) -> bool:
    """Whether legacy tables are there (an upgrade whose rows are not all moved yet)."""
    return await conn.fetchval("SELECT to_regclass('shadowproxy.requests_legacy')") is not None


async def move(conn: asyncpg.Connection, *, batch_size: int = 5000,
               max_batches: int | None = None) -> Moved:
    """Move legacy rows in batches of ``batch_size`` requests (all of them, or at most
    ``max_batches`` batches), and drop the legacy tables once they are empty."""
    if not await pending(conn):
        return Moved(0, 0, True)
    requests = responses = batches = 0
    last = UUID(int=0)
    while max_batches is None or batches < max_batches:
        async with conn.transaction():
            row = await conn.fetchrow(_MOVE_BATCH, last, batch_size)
        assert row is not None  # an aggregate SELECT always returns one row
        if row["last"] is None:
            break
        last = row["last"]
        requests += row["requests"]
        responses += row["responses"]
        batches += 1
    else:
        return Moved(requests, responses, False)
    while True:
        async with conn.transaction():
            orphans = await conn.fetchval(_MOVE_ORPHANS, batch_size)
        responses += orphans
        if orphans == 0:
            break
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        # Rows of a request id below `last` cannot appear (no writer uses these tables), but
        # the check is cheap and the drop must never lose a row.
        left = await conn.fetchval(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM shadowproxy.requests_legacy LIMIT 1) a)"
            " + (SELECT count(*) FROM (SELECT 1 FROM shadowproxy.responses_legacy LIMIT 1) b)")
        if left:
            return Moved(requests, responses, False)
        try:
            await conn.execute(
                "DROP TABLE shadowproxy.requests_legacy, shadowproxy.responses_legacy")
        except asyncpg.DependentObjectsStillExistError as exc:
            # A view (or other object) of the user's over the old tables followed their
            # rename in migration 005: it reads the emptied legacy tables now. Dropping it
            # is the user's call (PostgreSQL's own hint is DROP ... CASCADE), so say which.
            raise MigrationError(
                f"every record is in the partitioned tables, but the emptied "
                f"requests_legacy and responses_legacy cannot be dropped: {exc.detail}. "
                "Such objects followed the tables' rename in migration 005 and read the "
                "empty legacy tables now: create them again over shadowproxy.requests and "
                "shadowproxy.responses (or drop them), then run `shadowproxy migrate`; "
                "until then the hourly summaries, storage.retention and `shadowproxy "
                "prune` wait for the upgrade to end") from exc
    return Moved(requests, responses, True)
