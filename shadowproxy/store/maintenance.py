"""The running proxy's storage maintenance: partitions ahead, the upgrade's move, retention.

Every ``storage.maintenance_interval_s`` (and once at start), one background task per
process connects on its own connection and, if no other process is at it (the
``MAINTENANCE_LOCK`` advisory lock, tried, never waited for), creates the partitions of the
coming periods (``partitions.ensure``), moves the rows of an upgraded database out of the
legacy tables (``legacy.move``), and with ``storage.retention`` set drops the partitions
whose whole range is older than that (``prune.prune_before``): a record is kept for at
least the retention and at most one partition period more; ``shadowproxy prune`` cuts
exactly, deleting inside the partition across the cutoff. Last, it summarizes the hours that
have settled (``rollups.roll_up``, at most ``ROLLUP_HOURS_PER_RUN`` per run), which the
report reads for its exact counts instead of every pair.

It never touches the request path: the proxy answers clients and the recorder writes
whatever happens here, every statement gives up on a lock after
``partitions.LOCK_TIMEOUT`` (one that makes or drops a partition, or drops the legacy
tables) or ``database.LOCK_TIMEOUT_S`` (any other), and a failed run is logged, counted (in
``shadowproxy_storage_maintenance_total{result="failed"}``) and tried again at the next
interval, never fatal. The settings are read at each run, and a reload that changes them
starts the next run at once (``settings_changed``): a retention set, or an interval
shortened, by a reload waited for the whole interval the proxy was running with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from shadowproxy.config import StorageConfig
from shadowproxy.metrics import Metrics
from shadowproxy.store import legacy, partitions, rollups
from shadowproxy.store.database import connection, describe_error
from shadowproxy.store.legacy import Moved
from shadowproxy.store.partitions import MAINTENANCE_LOCK
from shadowproxy.store.prune import PruneResult, cutoff_before, prune_before
from shadowproxy.tasks import spawn

log = logging.getLogger("shadowproxy.storage")

ROLLUP_HOURS_PER_RUN = 24
ROLLUP_BUDGET_S = 60.0
"""Hours summarized per run (``rollups.roll_up``): at most a day of them, and no new one
after a minute, so that a run stays well inside its timeout; a database with a long history
not yet summarized catches up over the following runs."""
CLOSE_TIMEOUT_S = 10.0
"""How long a run's close waits for the database (which ends the session and its lock)."""
LEGACY_BATCHES_PER_RUN = 50
"""Batches of the upgrade's move per run (250,000 requests at the default batch size):
the rest waits for the next run, so that one run stays short."""


@dataclass(frozen=True)
class Outcome:
    """What one maintenance run did (``skipped``: another process holds the lock)."""

    skipped: bool = False
    created: list[str] = field(default_factory=list)
    moved: Moved | None = None
    pruned: PruneResult | None = None
    rolled: rollups.Rolled | None = None


async def run_once(url: str, storage: StorageConfig, *, timeout: float = 300.0) -> Outcome:
    """One maintenance run; raises whatever went wrong (the task logs and counts it).

    The run has its own connection, and the lock lives as long as the connection's session:
    closing it releases the lock. Everything the run waits for on the database, the lock
    included, is bounded by ``timeout``, and the close by ``CLOSE_TIMEOUT_S``, after which
    the connection is dropped: a database that stops answering (a network partition) fails
    the run, to be tried again at the next interval, instead of holding the task for good.
    """
    # A stop (the task cancelled) drops the connection instead of waiting on a database
    # that may not answer; asyncpg drops it too when the close fails or times out.
    async with connection(url, timeout=min(timeout, 10.0), close_timeout=CLOSE_TIMEOUT_S,
                          watch=False) as conn, asyncio.timeout(timeout):
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MAINTENANCE_LOCK):
            return Outcome(skipped=True)
        created = await partitions.ensure(conn, storage.partition)
        moved = await legacy.move(conn, max_batches=LEGACY_BATCHES_PER_RUN)
        pruned = None
        if storage.retention is not None and moved.finished:
            cutoff = await cutoff_before(conn, storage.retention)
            pruned = await prune_before(conn, cutoff, whole_partitions=True)
        rolled = None
        if moved.finished:
            rolled = await rollups.roll_up(conn, max_hours=ROLLUP_HOURS_PER_RUN,
                                           budget_s=ROLLUP_BUDGET_S)
    return Outcome(created=created, moved=moved, pruned=pruned, rolled=rolled)


class Maintenance:
    """The periodic task: ``start`` it with the proxy, ``close`` it before the recorder."""

    def __init__(self, url: str, storage: Callable[[], StorageConfig], metrics: Metrics) -> None:
        self.url = url
        self._storage = storage
        """The running configuration's storage settings (read at each run: reloadable)."""
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        """Set by a reload that changed the storage settings: run again now."""
        self.runs = 0
        """Runs finished, done or failed (tests wait on it)."""

    def start(self) -> None:
        self._task = spawn(self._loop(), name="storage-maintenance")

    def settings_changed(self) -> None:
        """A reload changed the storage settings: run with them now (after the run under
        way, if one is), instead of at the end of the current interval."""
        self._changed.set()

    async def _loop(self) -> None:
        while True:
            self._changed.clear()
            storage = self._storage()
            try:
                outcome = await run_once(self.url, storage)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: logged, counted, tried again later
                self._metrics.maintenance["failed"] += 1
                log.warning("storage maintenance failed (%s); next try in %.0f s",
                            describe_error(exc), storage.maintenance_interval_s)
            else:
                self._metrics.maintenance["ok"] += 1
                _log(outcome)
            self.runs += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), storage.maintenance_interval_s)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _log(outcome: Outcome) -> None:
    if outcome.created:
        log.info("created partitions %s", ", ".join(outcome.created))
    moved = outcome.moved
    if moved is not None and (moved.requests or moved.responses):
        log.info("moved %d requests and %d responses into the partitioned tables%s",
                 moved.requests, moved.responses,
                 "" if moved.finished else " (more at the next run)")
    pruned = outcome.pruned
    if pruned is not None and (pruned.requests or pruned.responses or pruned.dropped):
        log.info("retention: removed %s%d requests and %d responses received before %s "
                 "(%d partition(s) dropped)", "about " if pruned.estimated else "",
                 pruned.requests, pruned.responses,
                 pruned.cutoff.isoformat(timespec="seconds"), len(pruned.dropped))
    rolled = outcome.rolled
    if rolled is not None and rolled.hours:
        log.info("summarized %d hour(s) of %d requests for the report%s", rolled.hours,
                 rolled.requests, " (more at the next run)" if rolled.more else "")
