"""The running proxy's storage maintenance: partitions ahead, retention by whole partitions,
one process at a time, and failures counted, never fatal."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta

import aiohttp
import asyncpg
import pytest

from shadowproxy.config import StorageConfig
from shadowproxy.metrics import Metrics
from shadowproxy.store import maintenance
from shadowproxy.store.maintenance import Maintenance, run_once
from shadowproxy.store.partitions import MAINTENANCE_LOCK, ensure, partitions, period_start
from tests.conftest import StartProxy, route
from tests.dblink import DatabaseLink
from tests.test_admin import samples
from tests.upstreams import model, serve


async def _old_partitions(conn: asyncpg.Connection, days: int) -> list[str]:
    """Partitions (and a record in each) for each of the last ``days`` days."""
    now = await conn.fetchval("SELECT now()")
    await ensure(conn, "day", now=now - timedelta(days=days), ahead=days)
    # Each record halfway between its day's start and this time of day: inside the day's
    # partition and, in the partition across a cutoff of whole days, before the cutoff,
    # whatever the time of day the test runs.
    half_today = (now - period_start(now, "day")) / 2
    for d in range(1, days + 1):
        when = period_start(now - timedelta(days=d), "day") + half_today
        await conn.execute(
            "INSERT INTO shadowproxy.requests (id, request_id, route, received_at, method, "
            "path) VALUES (gen_random_uuid(), 'old', 'r', $1, 'POST', '/')", when)
    return [p.name for p in await partitions(conn)]


async def test_retention_drops_whole_partitions_only(database_url: str) -> None:
    """With retention 3d a run drops the partitions that end more than three days ago and
    leaves the one across the cutoff whole (kept up to one period longer)."""
    conn = await asyncpg.connect(database_url)
    try:
        before = await _old_partitions(conn, 6)
        now = await conn.fetchval("SELECT now()")
        outcome = await run_once(database_url, StorageConfig(retention="3d"))
        after = [p.name for p in await partitions(conn)]
        oldest_kept = await conn.fetchval("SELECT min(received_at) FROM shadowproxy.requests")
    finally:
        await conn.close()
    assert outcome.pruned is not None and not outcome.skipped
    cutoff = now - timedelta(days=3)
    straddle = period_start(cutoff, "day")
    assert len(outcome.pruned.dropped) == len(set(before) - set(after)) >= 2
    assert all(name >= f"requests_p{straddle:%Y%m%d}" for name in after)
    assert outcome.pruned.batches == 0
    assert oldest_kept < cutoff  # the straddling partition's record is still there


async def test_retention_keeps_the_summaries_of_the_records_it_keeps(
        database_url: str) -> None:
    """The partition across the retention's cutoff keeps its records, and with them the
    summaries of their hours: once the runs have caught up with the history, a run
    summarizes no request again (forgotten at each run, those hours took the runs' budget
    of hours ahead of the new ones)."""
    conn = await asyncpg.connect(database_url)
    try:
        await _old_partitions(conn, 6)
        storage = StorageConfig(retention="3d")
        runs = [await run_once(database_url, storage)]
        while runs[-1].rolled is not None and runs[-1].rolled.more and len(runs) < 10:
            runs.append(await run_once(database_url, storage))
        kept = await conn.fetchval("SELECT count(*) FROM shadowproxy.requests")
        again = await run_once(database_url, storage)
        summarized = await conn.fetchval(
            "SELECT coalesce(sum(requests), 0) FROM shadowproxy.rollup_hours")
    finally:
        await conn.close()
    assert runs[0].pruned is not None and len(runs[0].pruned.dropped) >= 2
    assert again.rolled is not None and again.rolled.requests == 0, again.rolled
    assert summarized == kept == 3  # the straddling partition's record is summarized once


async def test_a_run_is_skipped_while_another_process_maintains(database_url: str) -> None:
    """Only one process at a time: while the maintenance lock is held elsewhere, a run
    does nothing and says so."""
    holder = await asyncpg.connect(database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MAINTENANCE_LOCK)
        outcome = await run_once(database_url, StorageConfig())
    finally:
        await holder.close()
    assert outcome.skipped


async def test_a_failing_maintenance_is_counted_and_not_fatal() -> None:
    """A database that cannot be reached: each run fails, is counted, and the task goes on
    to the next interval."""
    metrics = Metrics()
    task = Maintenance("postgresql://nobody@127.0.0.1:1/none",
                       lambda: StorageConfig(maintenance_interval_s=0.05), metrics)
    task.start()
    try:
        deadline = time.monotonic() + 20
        while task.runs < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        await task.close()
    assert task.runs >= 2
    assert metrics.maintenance["failed"] >= 2
    assert metrics.maintenance["ok"] == 0


async def test_the_proxy_applies_its_retention_on_its_own(
        start_proxy: StartProxy, database_url: str) -> None:
    """A proxy with storage.retention drops old partitions while it serves, counts its runs
    in /metrics, and keeps answering clients."""
    conn = await asyncpg.connect(database_url)
    try:
        await _old_partitions(conn, 5)
        async with serve(model("p")) as primary, start_proxy(
                [route(primary.url)],
                storage={"retention": "2d", "maintenance_interval_s": 0.1}) as proxy:
            assert proxy.maintenance is not None
            deadline = time.monotonic() + 30
            while proxy.maintenance.runs < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            async with aiohttp.ClientSession() as session:
                async with session.post(f"http://127.0.0.1:{proxy.port}/p", json={}) as resp:
                    assert resp.status == 200
                async with session.get(
                        f"http://127.0.0.1:{proxy.admin_port}/metrics") as resp:
                    exposed = samples(await resp.text())
        oldest = await conn.fetchval("SELECT min(received_at) FROM shadowproxy.requests")
        now = await conn.fetchval("SELECT now()")
    finally:
        await conn.close()
    ok = exposed[("shadowproxy_storage_maintenance_total", (("result", "ok"),))]
    assert ok >= 2
    assert exposed[("shadowproxy_storage_maintenance_total", (("result", "failed"),))] == 0
    assert oldest >= period_start(now - timedelta(days=2), "day")


@pytest.mark.parametrize("silent_from", [b"pg_try_advisory_lock", b"pg_inherits"],
                         ids=["taking the lock", "listing partitions"])
async def test_a_database_that_stops_answering_fails_the_run_instead_of_hanging(
        database_url: str, monkeypatch: pytest.MonkeyPatch, silent_from: bytes) -> None:
    """A database that goes silent mid-run (a partition: the connection stays open, nothing
    comes back) fails the run at its timeout, the connection dropped, for the next interval
    to try again; the run waited for ever, and maintenance never ran again. Once the
    connection is gone, the lock is free for the next run."""
    monkeypatch.setattr(maintenance, "CLOSE_TIMEOUT_S", 0.5)
    async with DatabaseLink(database_url) as link:
        assert not (await run_once(link.url, StorageConfig(), timeout=10.0)).skipped
        link.freeze_on(silent_from)
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(run_once(link.url, StorageConfig(), timeout=1.0), 15.0)
        assert link.frozen.is_set() and time.monotonic() - began < 5.0
    assert not (await run_once(database_url, StorageConfig())).skipped


async def test_a_stop_during_a_run_on_a_silent_database_ends_at_once(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop (the task cancelled) while a run waits on a silent database drops the
    connection at once: it waited for a polite close, up to CLOSE_TIMEOUT_S."""
    monkeypatch.setattr(maintenance, "CLOSE_TIMEOUT_S", 30.0)
    async with DatabaseLink(database_url) as link:
        link.freeze_on(b"pg_inherits")
        run = asyncio.create_task(run_once(link.url, StorageConfig(), timeout=60.0))
        while not link.frozen.is_set():
            await asyncio.sleep(0.01)
        run.cancel()
        began = time.monotonic()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(run, 10.0)
        assert run.cancelled() and time.monotonic() - began < 2.0
