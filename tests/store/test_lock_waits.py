"""Commands behind a lock that another session holds: each waits at most
``database.LOCK_TIMEOUT_S`` for it, then fails saying what holds it up and what to do; they
waited without end and without a word. The lock is held by a real second session."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from shadowproxy.cli import main
from shadowproxy.recorder import postgres
from shadowproxy.store import database
from shadowproxy.store.migrate import _LOCK_KEY
from shadowproxy.store.partitions import MAINTENANCE_LOCK
from tests.conftest import StartProxy, route
from tests.db import fetchval
from tests.upstreams import model, serve

WAIT_S = 1.0

LOCKED = ("canceling statement due to lock timeout: another session held a lock on the "
          "shadowproxy tables that this needed longer than a command waits for one (1 s; ")


@pytest.fixture(autouse=True)
def short_lock_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(database, "LOCK_TIMEOUT_S", WAIT_S)


@asynccontextmanager
async def holding(url: str, sql: str) -> AsyncIterator[int]:
    """Another session, in an open transaction that has run ``sql``; yields its pid."""
    conn = await asyncpg.connect(url)
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(sql)
        yield conn.get_server_pid()
    finally:
        await transaction.rollback()
        await conn.close()


def write_config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(f"""\
admin_listen: null
data_dir: {tmp_path / "data"}
database: {{url: "{url}"}}
routes:
  - name: r
    primary: {{url: "http://127.0.0.1:9"}}
    shadows: [{{name: s, url: "http://127.0.0.1:8"}}]
""")
    return path


async def run(argv: list[str]) -> tuple[int, float]:
    """The command line in a thread of its own (it runs its own event loop): its exit status
    and how long it took."""
    started = time.monotonic()
    status = await asyncio.to_thread(main, argv)
    return status, time.monotonic() - started


@pytest.mark.parametrize(("lock", "command", "expected"), [
    # CREATE INDEX takes this lock, which the row-by-row delete waits for.
    ("LOCK TABLE shadowproxy.requests IN SHARE MODE",
     ["prune", "-c", "CONFIG", "--older-than", "1d"], "prune failed on "),
    ("LOCK TABLE shadowproxy.requests IN ACCESS EXCLUSIVE MODE",
     ["report", "-c", "CONFIG", "--route", "r"], "a report query failed: "),
    ("LOCK TABLE shadowproxy.labels IN ACCESS EXCLUSIVE MODE",
     ["labels", "import", "-c", "CONFIG", "LABELS"], "importing labels failed: "),
    ("LOCK TABLE shadowproxy.requests_default IN ACCESS EXCLUSIVE MODE",
     ["migrate", "-c", "CONFIG"], "preparing the partitions failed: "),
])
async def test_a_command_behind_a_table_lock_fails_in_bounded_time(
        database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], lock: str,
        command: list[str], expected: str) -> None:
    config = write_config(tmp_path, database_url)
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,label\nabc,1\n")
    argv = [{"CONFIG": str(config), "LABELS": str(labels)}.get(a, a) for a in command]
    async with holding(database_url, lock):
        status, took = await run(argv)
    err = capsys.readouterr().err
    assert status == 1, err
    assert took < WAIT_S + 10
    assert expected in err and LOCKED in err, err
    assert "docs/operations.md (Locks) shows how to find it" in err
    status, _ = await run(argv)  # the lock released: the command goes through
    assert status == 0, capsys.readouterr().err


@pytest.mark.parametrize("command", [["prune", "--older-than", "1d"], ["migrate"]])
async def test_a_command_behind_the_maintenance_lock_names_its_holder(
        database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        command: list[str]) -> None:
    """The maintenance lock (another prune or migrate, a proxy's maintenance run) held
    past the wait: the command says so, with the holder's backend pid."""
    config = write_config(tmp_path, database_url)
    async with holding(database_url, f"SELECT pg_advisory_xact_lock({MAINTENANCE_LOCK})"
                       ) as pid:
        status, took = await run([command[0], "-c", str(config), *command[1:]])
    err = capsys.readouterr().err
    assert status == 1, err
    assert took < WAIT_S + 10
    assert (f"another process holds the maintenance lock (PostgreSQL backend {pid}), still "
            "after 1s: `shadowproxy migrate` or `prune`, or a proxy's maintenance run") in err


async def test_migrate_behind_the_migration_lock_says_so(
        database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, database_url)
    async with holding(database_url, f"SELECT pg_advisory_xact_lock({_LOCK_KEY})") as pid:
        status, took = await run(["migrate", "-c", str(config)])
    err = capsys.readouterr().err
    assert status == 1, err
    assert took < WAIT_S + 10
    assert (f"another process (PostgreSQL backend {pid}) has been applying the schema "
            "migrations for longer than 1s (`shadowproxy migrate`, or a proxy or replay "
            "starting)") in err


@pytest.mark.parametrize(("lock", "said"), [
    (f"SELECT pg_advisory_xact_lock({_LOCK_KEY})",
     "another process (PostgreSQL backend {pid}) held the schema migrations' lock for longer "
     "than the recorder waits for it (1 s): `shadowproxy migrate`, or a proxy or replay "
     "starting, applying them; records go to the spool until it has finished"),
    ("LOCK TABLE shadowproxy.schema_migrations IN ACCESS EXCLUSIVE MODE",
     "could not apply the schema migrations on "),
])
async def test_a_proxy_starting_behind_the_migrations_lock_serves_and_says_which_lock(
        start_proxy: StartProxy, database_url: str, monkeypatch: pytest.MonkeyPatch,
        lock: str, said: str) -> None:
    """Another session holds what the recorder's migrations need when the proxy starts: the
    start waits the recorder's lock timeout (``RECORDER_LOCK_TIMEOUT_S``) at most, then
    serves and spools, saying which lock and what becomes of the records; they are stored
    once it is released. The start waited for the writer's whole 15 s timeout, the
    listener closed meanwhile, and then said `no answer from the database within 15 s`."""
    monkeypatch.setattr(postgres, "RECORDER_LOCK_TIMEOUT_S", WAIT_S)
    async with serve(model("v1")) as primary, aiohttp.ClientSession() as http, \
            AsyncExitStack() as held:
        pid = await held.enter_async_context(holding(database_url, lock))
        began = time.monotonic()
        async with start_proxy([route(primary.url)]) as proxy:
            assert time.monotonic() - began < WAIT_S + 3
            problem = proxy.recorder.problem
            assert problem is not None
            assert said.format(pid=pid) in problem.cause
            for i in range(3):
                resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", json={"i": i})
                assert resp.status == 200
            await asyncio.wait_for(proxy.recorder.drained(), 5)
            assert proxy.metrics.records["spooled"] == 3
            await held.aclose()  # the other session ends its transaction
            for _ in range(200):
                if proxy.metrics.records["written"] == 3:
                    break
                await asyncio.sleep(0.05)
            assert proxy.metrics.records["written"] == 3
    assert await fetchval(database_url, "SELECT count(*) FROM shadowproxy.requests") == 3


async def test_a_write_behind_a_table_lock_is_spooled_saying_which_lock(
        start_proxy: StartProxy, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CREATE INDEX, VACUUM FULL or open transaction holds the records' table: the write
    waits the recorder's lock timeout, then its batch is spooled with a line that names the
    lock and what to do. It waited the writer's whole 15 s and said `no answer from the
    database within 15 s`, blaming the network."""
    monkeypatch.setattr(postgres, "RECORDER_LOCK_TIMEOUT_S", WAIT_S)
    async with serve(model("v1")) as primary, aiohttp.ClientSession() as http, \
            start_proxy([route(primary.url)]) as proxy:
        async with holding(database_url,
                           "LOCK TABLE shadowproxy.requests IN ACCESS EXCLUSIVE MODE"):
            resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", json={"i": 1})
            assert resp.status == 200
            began = time.monotonic()
            await asyncio.wait_for(proxy.recorder.drained(), 10)
            assert time.monotonic() - began < WAIT_S + 2
            assert proxy.metrics.records["spooled"] == 1
            problem = proxy.recorder.problem
            assert problem is not None
            assert ("canceling statement due to lock timeout (SQLSTATE 55P03): another session "
                    "held a lock on the shadowproxy tables that the recorder needed for longer "
                    "than it waits for one (1 s)") in problem.cause
            assert "docs/operations.md (Locks) shows how to find it" in problem.cause
        for _ in range(200):
            if proxy.metrics.records["written"] == 1:
                break
            await asyncio.sleep(0.05)
        assert proxy.metrics.records["written"] == 1


async def test_a_table_lock_held_for_long_is_logged_once_not_as_a_flapping_database(
        start_proxy: StartProxy, database_url: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A lock on the records' tables held for several of the replay's retries: the log says
    once that the writes wait behind it, and once that the database takes them again when
    it is released. The replay's check (``SELECT 1``) succeeded under the lock, so the log
    said `database reachable again` and then the lock's failure again, every few seconds
    for as long as the lock was held."""
    monkeypatch.setattr(postgres, "RECORDER_LOCK_TIMEOUT_S", WAIT_S)
    caplog.set_level("INFO", logger="shadowproxy.recorder")

    def said(text: str) -> int:
        return sum(text in r.getMessage() for r in caplog.records
                   if r.name == "shadowproxy.recorder")

    async with serve(model("v1")) as primary, aiohttp.ClientSession() as http, \
            start_proxy([route(primary.url)]) as proxy:
        async with holding(database_url,
                           "LOCK TABLE shadowproxy.requests IN ACCESS EXCLUSIVE MODE"):
            for i in range(3):
                resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", json={"i": i})
                assert resp.status == 200
            await asyncio.wait_for(proxy.recorder.drained(), 10)
            await asyncio.sleep(4 * WAIT_S + 2)  # the replay's backoff: 0.2, 0.5, 1, 2 s
            assert proxy.metrics.records["written"] == 0
            assert said("canceling statement due to lock timeout") == 1, caplog.text
            # The database answers: the line names the lock, not the network.
            assert said("the database holds the records back behind another session's "
                        "lock (") == 1, caplog.text
            assert said("database not reachable") == 0, caplog.text
            assert said("database reachable again") == 0, caplog.text
        for _ in range(200):
            if proxy.metrics.records["written"] == 3:
                break
            await asyncio.sleep(0.05)
        assert proxy.metrics.records["written"] == 3
        assert said("database reachable again") == 1, caplog.text
        assert said("canceling statement due to lock timeout") == 1, caplog.text


async def test_a_proxy_starting_behind_a_table_lock_serves_and_names_the_lock(
        start_proxy: StartProxy, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The records' table locked by another session when the proxy starts: the start's check
    waits the recorder's lock timeout, then the proxy serves and spools, with the lock and
    what to do as the cause. The check (`SELECT 1`) passed, and only the first write found
    the lock."""
    monkeypatch.setattr(postgres, "RECORDER_LOCK_TIMEOUT_S", WAIT_S)
    async with serve(model("v1")) as primary, aiohttp.ClientSession() as http, \
            AsyncExitStack() as held:
        await held.enter_async_context(holding(
            database_url, "LOCK TABLE shadowproxy.responses IN ACCESS EXCLUSIVE MODE"))
        began = time.monotonic()
        async with start_proxy([route(primary.url)]) as proxy:
            assert time.monotonic() - began < WAIT_S + 3
            problem = proxy.recorder.problem
            assert problem is not None
            assert "docs/operations.md (Locks) shows how to find it" in problem.cause
            resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", json={"i": 1})
            assert resp.status == 200
            await asyncio.wait_for(proxy.recorder.drained(), 5)
            assert proxy.metrics.records["spooled"] == 1
            await held.aclose()
            for _ in range(200):
                if proxy.metrics.records["written"] == 1:
                    break
                await asyncio.sleep(0.05)
            assert proxy.metrics.records["written"] == 1
