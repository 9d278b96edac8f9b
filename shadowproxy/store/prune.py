"""Retention: ``shadowproxy prune -c FILE --older-than 30d`` deletes old records in batches.

Each batch is one short transaction that picks the oldest requests before the cutoff (through
the ``received_at`` index), deletes their responses and then the requests themselves, and
commits. No batch holds locks for long, rows another transaction has locked are skipped
rather than waited for, and the recorder keeps writing throughout. The cutoff is computed
once, on the database's clock, so a long prune does not chase the present.

Labels (``shadowproxy.labels``) are the user's own data and are left alone. At a scale where
deleting row by row is too slow, partition the tables by time and drop whole partitions
instead (see ``deploy/kubernetes/README.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from shadowproxy.errors import DatabaseError, UsageError
from shadowproxy.store.database import CONNECTION_ERRORS, connection, describe

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_AGE = re.compile(r"^(\d+)([smhdw])$")
_AGE_EXAMPLE = "a whole number and a unit s, m, h, d or w, e.g. 30d, 12h or 90m"

# Both deletes see the same snapshot of `doomed`, so a request and its responses go together.
# SKIP LOCKED: a row some other transaction holds is left for the next run, never waited on.
_DELETE_BATCH = """
WITH doomed AS (
    SELECT id FROM shadowproxy.requests
    WHERE received_at < $1
    ORDER BY received_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone_responses AS (
    DELETE FROM shadowproxy.responses WHERE request IN (SELECT id FROM doomed) RETURNING 1
), gone_requests AS (
    DELETE FROM shadowproxy.requests WHERE id IN (SELECT id FROM doomed) RETURNING 1
)
SELECT (SELECT count(*) FROM gone_requests) AS requests,
       (SELECT count(*) FROM gone_responses) AS responses
"""


def parse_age(text: str) -> timedelta:
    """``30d`` → 30 days; UsageError, with an example, for anything else."""
    m = _AGE.fullmatch(text.strip())
    if not m:
        raise UsageError(f"--older-than: expected {_AGE_EXAMPLE} (got {text!r})")
    amount = int(m.group(1))
    if amount == 0:
        raise UsageError(f"--older-than: an age of 0 would delete everything; expected "
                         f"{_AGE_EXAMPLE} (got {text!r})")
    return timedelta(**{_UNITS[m.group(2)]: amount})


@dataclass(frozen=True)
class PruneResult:
    """How much one prune removed, and from before when."""

    cutoff: datetime
    requests: int
    responses: int
    batches: int


async def prune(url: str, older_than: timedelta, *, batch_size: int = 5000) -> PruneResult:
    """Delete requests received more than ``older_than`` ago, and their responses."""
    if batch_size < 1:
        raise UsageError(f"--batch-size: expected 1 or more (got {batch_size})")
    async with connection(url) as conn:
        try:
            if await conn.fetchval("SELECT to_regclass('shadowproxy.requests')") is None:
                raise DatabaseError(
                    f"the database at {describe(url)} has no shadowproxy tables; "
                    "run `shadowproxy migrate -c FILE` first (or check database.url)")
            cutoff: datetime = await conn.fetchval("SELECT now() - $1::interval", older_than)
            requests = responses = batches = 0
            while True:
                row = await conn.fetchrow(_DELETE_BATCH, cutoff, batch_size)
                assert row is not None  # an aggregate SELECT always returns one row
                if row["requests"] == 0:
                    break
                requests += row["requests"]
                responses += row["responses"]
                batches += 1
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise DatabaseError(f"prune failed on {describe(url)}: {exc}") from exc
    return PruneResult(cutoff=cutoff, requests=requests, responses=responses, batches=batches)


def run_prune(args: argparse.Namespace) -> int:
    """The ``prune`` command: validate the arguments, prune, say how much went."""
    from shadowproxy.config import load_config
    from shadowproxy.store.database import database_url

    older_than = parse_age(args.older_than)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: expected 1 or more (got {args.batch_size})")
    settings = load_config(args.config)
    url = database_url(settings)
    result = asyncio.run(prune(url, older_than, batch_size=args.batch_size))
    when = result.cutoff.isoformat(timespec="seconds")
    if result.requests == 0:
        print(f"nothing to prune: no requests received before {when} ({describe(url)})")
    else:
        print(f"pruned {result.requests} requests and {result.responses} responses received "
              f"before {when}, in {result.batches} batch(es) ({describe(url)})")
    return 0
