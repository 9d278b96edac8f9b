"""Database outages and crashes, injected for real: no record is lost, no client fails."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.conftest import StartProxy, route
from tests.pgcontrol import OwnPostgres
from tests.test_admin import samples
from tests.test_run_command import start, wait_ready, write_config
from tests.upstreams import model, serve


@pytest.fixture
def own_pg() -> Iterator[OwnPostgres]:
    pg = OwnPostgres()
    yield pg
    pg.close()


async def count(url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(url)
    try:
        return (int(await conn.fetchval("SELECT count(*) FROM shadowproxy.requests")),
                int(await conn.fetchval("SELECT count(*) FROM shadowproxy.responses")))
    finally:
        await conn.close()


async def eventually(url: str, expected: tuple[int, int], timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            got = await count(url)
        except (OSError, asyncpg.PostgresError):
            got = (-1, -1)
        if got == expected or asyncio.get_running_loop().time() > deadline:
            assert got == expected
            return
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_database_outage_in_the_middle_of_a_load_loses_nothing(
        start_proxy: StartProxy, own_pg: OwnPostgres) -> None:
    """With PostgreSQL stopped mid-load, clients are served and all N pairs land exactly once."""
    n = 300
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow, \
            start_proxy([route(primary.url, shadow.url)], url=own_pg.url) as proxy, \
            aiohttp.ClientSession() as http:
        admin = f"http://127.0.0.1:{proxy.admin_port}"
        statuses: list[int] = []

        async def client(k: int) -> None:
            for i in range(k, n, 4):
                resp = await http.post(f"http://127.0.0.1:{proxy.port}/p",
                                       json={"features": {"i": i}})
                await resp.read()
                statuses.append(resp.status)
                await asyncio.sleep(0.005)

        load = asyncio.gather(*(client(k) for k in range(4)))
        while len(statuses) < n // 3:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(own_pg.stop)
        while len(statuses) < 2 * n // 3:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # let at least one flush hit the outage
        ready = await http.get(f"{admin}/readyz")
        assert ready.status == 200
        detail = await ready.json()
        assert detail["database"] == "unreachable, spooling"
        assert detail["database_error"]["class"] == "transient"  # an outage: stay ready
        m = samples(await (await http.get(f"{admin}/metrics")).text())
        assert m[("shadowproxy_records_total", (("outcome", "spooled"),))] > 0
        assert m[("shadowproxy_database_up", ())] == 0
        assert m[("shadowproxy_database_error", (("class", "transient"),))] == 1
        await asyncio.to_thread(own_pg.start)
        await load
        assert statuses == [200] * n
        await eventually(own_pg.url, (n, 2 * n))
        assert proxy.recorder.database_ok
        assert "database_error" not in await (await http.get(f"{admin}/readyz")).json()
    assert not list((proxy.settings.data_dir / "spool").glob("*.spool"))


@pytest.mark.slow
async def test_proxy_started_while_the_database_is_down_serves_and_catches_up(
        start_proxy: StartProxy, own_pg: OwnPostgres) -> None:
    """A proxy that starts during an outage serves at once and migrates and replays later."""
    await asyncio.to_thread(own_pg.stop)
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url)], url=own_pg.url) as proxy, \
            aiohttp.ClientSession() as http:
        for _ in range(10):
            assert (await http.post(f"http://127.0.0.1:{proxy.port}/p", json={})).status == 200
        await asyncio.sleep(0.3)
        assert not proxy.recorder.database_ok
        await asyncio.to_thread(own_pg.start)
        await eventually(own_pg.url, (10, 10))


@pytest.mark.slow
async def test_kill_9_then_restart_replays_the_spool(tmp_path: Path,
                                                      own_pg: OwnPostgres) -> None:
    """Records spooled by a process killed with SIGKILL are stored by the next start."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow:
        config, port, admin = write_config(tmp_path, primary.url, shadow.url, own_pg.url)
        proc = await start(config)
        await wait_ready(admin, proc)
        await asyncio.to_thread(own_pg.stop)
        async with aiohttp.ClientSession() as http:
            for i in range(50):
                resp = await http.post(f"http://127.0.0.1:{port}/p", json={"features": {"i": i}})
                assert resp.status == 200
            for _ in range(100):  # wait until all 50 are spooled (fsynced)
                m = samples(await (await http.get(f"http://127.0.0.1:{admin}/metrics")).text())
                if m.get(("shadowproxy_records_total", (("outcome", "spooled"),))) == 50:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("records were not spooled")
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        assert list((tmp_path / "data" / "spool").glob("seg-*.spool"))
        await asyncio.to_thread(own_pg.start)
        proc = await start(config)
        try:
            await wait_ready(admin, proc)
            await eventually(own_pg.url, (50, 100))
        finally:
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 0
    assert not list((tmp_path / "data" / "spool").glob("seg-*.spool"))


async def test_full_spool_drops_and_counts_records_but_serves_clients(
        start_proxy: StartProxy, own_pg: OwnPostgres, caplog: pytest.LogCaptureFixture) -> None:
    """With the database down and the spool at its cap, records are dropped and counted
    (and the log says so once, not once per batch)."""
    await asyncio.to_thread(own_pg.stop)
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url)], url=own_pg.url,
                        recording={"spool_max_bytes": 1, "flush_interval_ms": 20}) as proxy, \
            aiohttp.ClientSession() as http:
        for _ in range(20):
            assert (await http.post(f"http://127.0.0.1:{proxy.port}/p", json={})).status == 200
        await proxy.recorder.drained()
        assert proxy.metrics.records["dropped"] == 20
        assert proxy.metrics.records["spooled"] == 0
        assert sum("spool full" in r.getMessage() for r in caplog.records) == 1
        ready = await http.get(f"http://127.0.0.1:{proxy.admin_port}/readyz")
        assert ready.status == 503  # nowhere to put records: take this instance out


async def test_a_spool_that_cannot_be_written_is_said_once_and_in_readyz(
        start_proxy: StartProxy, own_pg: OwnPostgres, caplog: pytest.LogCaptureFixture) -> None:
    """With the database down and the spool's directory gone under it (a file in its
    place: the writes fail as on a read-only file system, also for root), records are
    dropped and counted, the log says so once, and /readyz says that the spool cannot be
    written, not that it is full (which sent the operator to spool_max_bytes)."""
    await asyncio.to_thread(own_pg.stop)
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url)], url=own_pg.url,
                        recording={"flush_interval_ms": 20}) as proxy, \
            aiohttp.ClientSession() as http:
        spool_dir = proxy.recorder.spool.directory
        for held in spool_dir.iterdir():  # the spool's owner lock (spool.py): held, unlinked
            held.unlink()
        spool_dir.rmdir()
        spool_dir.write_bytes(b"")
        for _ in range(20):
            assert (await http.post(f"http://127.0.0.1:{proxy.port}/p", json={})).status == 200
            await proxy.recorder.drained()
        assert proxy.metrics.records["dropped"] == 20
        assert sum("cannot write to the spool" in r.getMessage() for r in caplog.records) == 1
        ready = await http.get(f"http://127.0.0.1:{proxy.admin_port}/readyz")
        assert ready.status == 503
        assert (await ready.json())["database"].startswith(
            "unreachable, the spool cannot be written"), await ready.text()
