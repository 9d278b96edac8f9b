"""A database that stops answering (a network partition: the connection stays open, nothing
comes back), injected for real with ``tests/dblink.py``: clients are served as usual, the
records go to the spool after the writer's timeout and are stored, each once, when the
database answers again. Every wait is bounded, so that a regression fails, never hangs."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from shadowproxy.app import Proxy
from shadowproxy.config import RecordingConfig
from shadowproxy.errors import DatabaseError
from shadowproxy.recorder.postgres import PostgresWriter
from shadowproxy.recorder.recorder import START_CHECK_S
from shadowproxy.recorder.rows import Row, RowEncoder
from shadowproxy.store.database import connect, quiet_cut_waiters
from tests.conftest import StartProxy, route
from tests.db import fetchval
from tests.dblink import DatabaseLink
from tests.faults.test_outage import count
from tests.recorder.exchanges import exchange
from tests.replay.helpers import (
    ROUTE,
    Result,
    finish,
    request,
    start_cli,
    store,
    write_config,
)
from tests.test_admin import samples
from tests.test_run_command import start as start_run
from tests.test_run_command import wait_ready
from tests.test_run_command import write_config as write_run_config
from tests.upstreams import model, serve, sleeping

WRITER_TIMEOUT_S = 1.0


@contextlib.asynccontextmanager
async def _killed_if_left(proc: asyncio.subprocess.Process) -> AsyncIterator[None]:
    """The block's process, killed at its end if it is still running (an assertion failed
    before it ended): a regression fails the test instead of leaving a process behind."""
    try:
        yield
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _until(check: object, timeout: float) -> None:
    async def poll() -> None:
        while not await check():  # type: ignore[operator]
            await asyncio.sleep(0.05)
    await asyncio.wait_for(poll(), timeout)


async def _send(http: aiohttp.ClientSession, proxy: Proxy, n: int) -> float:
    """``n`` requests, one after another; the slowest answer's seconds."""
    slowest = 0.0
    for i in range(n):
        began = time.monotonic()
        resp = await asyncio.wait_for(
            http.post(f"http://127.0.0.1:{proxy.port}/p", json={"i": i}), 5)
        assert resp.status == 200
        await resp.read()
        slowest = max(slowest, time.monotonic() - began)
    return slowest


async def test_a_silent_database_spools_after_the_timeout_and_stores_each_record_once(
        start_proxy: StartProxy, database_url: str) -> None:
    """The database goes silent in the middle of a COPY. The write gave up at its timeout
    by cancelling it, and the cancelled COPY's ROLLBACK waited for an answer for ever: the
    recorder stored nothing more, the queue filled up, /readyz said "ok", and a stop hung.
    Now the connection is cut at the timeout: the batch and those after it go to the spool,
    /readyz and /metrics say the database is away, and once the database answers a new
    connection the spool is stored, every record exactly once."""
    await asyncio.wait_for(_silent_then_back(start_proxy, database_url), 30)


async def _silent_then_back(start_proxy: StartProxy, database_url: str) -> None:
    async with DatabaseLink(database_url) as link, serve(model("v1")) as primary, \
            serve(model("v2")) as shadow, \
            start_proxy([route(primary.url, shadow.url)], url=link.url) as proxy, \
            aiohttp.ClientSession() as http:
        proxy.recorder.writer.timeout = WRITER_TIMEOUT_S
        admin = f"http://127.0.0.1:{proxy.admin_port}"
        await _send(http, proxy, 10)
        await _until(lambda: _stored(database_url, 10), 5)
        link.freeze_on(b"COPY")
        slowest = await _send(http, proxy, 40)
        assert slowest < 1.0  # the clients never wait for the database

        async def reported_away() -> bool:
            ready = await asyncio.wait_for(http.get(f"{admin}/readyz"), 2)
            return (ready.status == 200
                    and (await ready.json())["database"] == "unreachable, spooling")

        await _until(reported_away, 10 * WRITER_TIMEOUT_S)
        assert link.frozen.is_set()
        await asyncio.wait_for(proxy.recorder.drained(), 5)
        metrics = samples(await (await asyncio.wait_for(http.get(f"{admin}/metrics"), 2)).text())
        assert metrics[("shadowproxy_database_up", ())] == 0
        assert metrics[("shadowproxy_records_total", (("outcome", "spooled"),))] > 0
        assert metrics[("shadowproxy_records_total", (("outcome", "dropped"),))] == 0

        link.thaw()
        await _send(http, proxy, 10)
        await _until(lambda: _stored(database_url, 60), 10 * WRITER_TIMEOUT_S)
        assert await count(database_url) == (60, 120)
        assert proxy.recorder.database_ok
        assert proxy.metrics.records["written"] == 60
    assert await count(database_url) == (60, 120)
    assert not list((proxy.settings.data_dir / "spool").glob("*.spool"))


async def _stored(url: str, n: int) -> bool:
    return (await count(url))[0] == n


async def test_a_database_that_never_answers_the_connection_is_named_so(
        database_url: str) -> None:
    """Behind a partition, connecting times out; the commands said `cannot connect to
    PostgreSQL at URL: ; check that ...`, the cause left blank."""
    async with DatabaseLink(database_url) as link:
        link.freeze()
        with pytest.raises(DatabaseError) as failed:
            await asyncio.wait_for(connect(link.url, timeout=0.5), 5)
    assert f"cannot connect to PostgreSQL at {link.url}: no answer within 0.5 s; check " \
           "that PostgreSQL runs" in str(failed.value)


@pytest.mark.parametrize("command", [
    ["report", "--route", ROUTE, "--shadow", "s"],
    ["labels", "import", "LABELS"],
    ["prune", "--older-than", "1d"],
    ["migrate"],
])
async def test_ctrl_c_ends_a_command_whose_database_went_silent(
        database_url: str, tmp_path: Path, command: list[str]) -> None:
    """A command whose database stops answering mid-way waits for it (a query may take
    long); Ctrl-C ends it at once with exit status 130, the connection dropped so that
    PostgreSQL rolls back what was open. It hung, even after a second Ctrl-C for report
    and labels import: the cancelled transaction's ROLLBACK waited for an answer."""
    await store(database_url, [request(i, shadows=["s"]) for i in range(5)])
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,label\nreq-00001,1\n", encoding="utf-8")
    args = [str(labels) if arg == "LABELS" else arg for arg in command]
    async with DatabaseLink(database_url) as link:
        config = write_config(tmp_path, link.url,
                              shadows=[{"name": "s", "url": "http://127.0.0.1:8"}])
        link.freeze_on(b"SELECT")
        proc = await start_cli(*args, "-c", str(config))
        async with _killed_if_left(proc):
            await asyncio.wait_for(link.frozen.wait(), 20)
            await asyncio.sleep(0.3)
            assert proc.returncode is None  # waiting for the database
            proc.send_signal(signal.SIGINT)
            result = await finish(proc, timeout=5)
    assert result.status == 130, result.err
    # One line: what the interruption left, and what to do.
    assert result.err.startswith("shadowproxy: interrupted: "), result.err
    assert result.err.count("\n") == 1, result.err


async def test_a_connection_attempt_cut_while_it_connects_leaves_no_error_unretrieved(
        caplog: pytest.LogCaptureFixture) -> None:
    """A command's connection attempt cut by Ctrl-C as its socket connects (asyncpg's SSL
    request protocol made, its wait for the server's answer not yet awaited) left that
    wait's ConnectionError uncollected when the transport closed, and the command's last
    line was asyncio's `Future exception was never retrieved` with a traceback, after its
    own. The loop of every command keeps it out (``quiet_cut_waiters``); anything else
    still reaches the handler. The cut lands at that moment after a few turns of the loop
    (asyncio's): each number of turns is tried."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepted, never answered

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        quiet_cut_waiters(loop)
        with caplog.at_level(logging.DEBUG, logger="shadowproxy"):
            for turns in range(12):
                attempt = asyncio.ensure_future(
                    asyncpg.connect(f"postgresql://sp@127.0.0.1:{port}/sp", ssl="prefer"))
                for _ in range(turns):
                    await asyncio.sleep(0)
                attempt.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await attempt
                del attempt
                await asyncio.sleep(0.01)
                gc.collect()
                await asyncio.sleep(0)
        assert reported == []
        assert "a database connection that was cut ended with unexpected connection_lost" \
            in caplog.text  # the moment was hit, and kept out
        loop.call_exception_handler({"message": "something else", "exception": OSError()})
        assert [c["message"] for c in reported] == ["something else"]
    finally:
        loop.set_exception_handler(None)
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_ctrl_c_ends_a_replay_whose_database_went_silent_with_its_summary(
        database_url: str, tmp_path: Path) -> None:
    """A replay whose database stops answering mid-read waits for it; Ctrl-C ends it in a
    bounded time with exit status 130 and the summary, which says that the answers the
    database did not take wait in the spool. The count of the stored answers that the
    summary needs failed, and the replay ended with exit status 1 and that error alone.
    The end waits ``limits.shutdown_grace_s`` for the database, as a proxy's stop does."""
    await store(database_url, [request(i) for i in range(3000)])
    async with DatabaseLink(database_url) as link, \
            serve(sleeping(0.002, model("c"))) as target:
        config = write_config(tmp_path, link.url, limits={"shutdown_grace_s": 1})
        proc = await start_cli("replay", "-c", str(config), "--route", ROUTE, "--to",
                               target.url, "--as", "cand", "--since", "1h",
                               "--concurrency", "4", "--rate", "500")
        async with _killed_if_left(proc):
            while await fetchval(database_url, "SELECT count(*) FROM shadowproxy.responses "
                                               "WHERE target = 'cand'") < 20:
                assert proc.returncode is None
                await asyncio.sleep(0.05)
            link.freeze()
            await asyncio.sleep(1.0)
            assert proc.returncode is None  # waiting for the rest of the requests
            proc.send_signal(signal.SIGINT)
            began = time.monotonic()
            result = await finish(proc, timeout=40)
            ended_in = time.monotonic() - began
    assert result.status == 130, result.err
    assert "interrupted in" in result.out
    assert "stored    not known: the database did not answer" in result.out
    assert "answers not in the database: they wait in the spool" in result.out
    assert "no answer within 3 s" in result.err  # interrupted: the count waits 3 s, not 10
    assert ended_in < 10  # a grace of 1 s and the count's 3 s (the default grace is 10 s)


async def test_a_proxy_started_while_the_database_is_silent_serves_at_once(
        start_proxy: StartProxy, database_url: str) -> None:
    """A database that accepts no connection and says nothing (a partition) held the start
    for the writer's 15 s timeout, with clients waiting in the listener's queue and
    /readyz saying "starting"; it said `TimeoutError` then. The start now waits
    START_CHECK_S at most, then serves and spools, as for a database that is down."""
    await asyncio.wait_for(_started_while_silent(start_proxy, database_url), 30)


async def _started_while_silent(start_proxy: StartProxy, database_url: str) -> None:
    async with DatabaseLink(database_url) as link, serve(model("v1")) as primary:
        link.freeze()
        began = time.monotonic()
        async with start_proxy([route(primary.url)], url=link.url) as proxy, \
                aiohttp.ClientSession() as http:
            assert time.monotonic() - began < START_CHECK_S + 2.0
            assert await _send(http, proxy, 5) < 1.0
            ready = await http.get(f"http://127.0.0.1:{proxy.admin_port}/readyz")
            detail = await ready.json()
            assert ready.status == 200 and detail["database"] == "unreachable, spooling"
            assert detail["database_error"]["cause"] == \
                f"no answer from the database within {START_CHECK_S:g} s"
            await asyncio.wait_for(proxy.recorder.drained(), 5)
            assert proxy.metrics.records["spooled"] == 5


async def test_a_stop_while_the_database_is_silent_ends_within_its_grace(
        tmp_path: Path, database_url: str) -> None:
    """SIGTERM while a write waits for a database gone silent: the write is cut at the
    stop's grace and its batch spooled, and the next start stores every record. The stop
    waited for the writer's whole timeout (15 s with a grace of 2 s), past the kill
    timeout a supervisor is told to give (twice the grace and a few seconds)."""
    async with DatabaseLink(database_url) as link, serve(model("v1")) as primary, \
            serve(model("v2")) as shadow, aiohttp.ClientSession() as http:
        config, port, admin = write_run_config(tmp_path, primary.url, shadow.url, link.url,
                                               limits={"shutdown_grace_s": 2})
        proc = await start_run(config)
        async with _killed_if_left(proc):
            await wait_ready(admin, proc)
            for i in range(10):
                if i == 5:
                    await asyncio.sleep(0.5)  # the first five stored
                    link.freeze()
                resp = await http.post(f"http://127.0.0.1:{port}/p", json={"i": i})
                assert resp.status == 200
            await asyncio.sleep(0.3)  # their batch on its way to the silent database
            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            took = time.monotonic() - began
        assert took < 2 * 2 + 2, took
        assert await count(database_url) == (5, 10)
        config, port, admin = write_run_config(tmp_path, primary.url, shadow.url,
                                               database_url)
        proc = await start_run(config)
        try:
            await wait_ready(admin, proc)
            await _until(lambda: _stored(database_url, 10), 15)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert await count(database_url) == (10, 20)


async def test_a_stop_with_the_database_silent_and_nothing_to_write_ends_within_its_grace(
        tmp_path: Path, database_url: str) -> None:
    """SIGTERM with every record stored and the database gone silent since: nothing is
    waiting to be written, and the writer's idle connection is closed within what is left
    of the grace. Its polite close waited 5 s for the silent database, and a stop whose
    grace the queue had used up went on past a supervisor's kill."""
    async with DatabaseLink(database_url) as link, serve(model("v1")) as primary, \
            serve(model("v2")) as shadow, aiohttp.ClientSession() as http:
        config, port, admin = write_run_config(tmp_path, primary.url, shadow.url, link.url,
                                               limits={"shutdown_grace_s": 1})
        proc = await start_run(config)
        async with _killed_if_left(proc):
            await wait_ready(admin, proc)
            for i in range(5):
                resp = await http.post(f"http://127.0.0.1:{port}/p", json={"i": i})
                assert resp.status == 200
            await _until(lambda: _stored(database_url, 5), 10)
            link.freeze()
            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            took = time.monotonic() - began
        assert took < 1 + 1.5, took
    assert await count(database_url) == (5, 10)


async def test_a_connection_cancelled_while_it_is_set_up_ends_cancelled(
        database_url: str) -> None:
    """A command's or the maintenance's connection cancelled while it sets its lock timeout
    (a stop, Ctrl-C, the database gone silent) ends with the cancellation: the clean-up
    raised a TypeError of its own instead, and a stop waited on a task that would not end."""
    async with DatabaseLink(database_url) as link:
        link.freeze_on(b"SET lock_timeout")
        connecting = asyncio.ensure_future(connect(link.url))
        await asyncio.wait_for(link.frozen.wait(), 10)
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(connecting, 5)


def _larger_than_the_socket_buffers() -> tuple[list[Row], list[Row]]:
    """The rows of a batch of 40 exchanges with 200 kB bodies: 8 MB, more than a socket's
    buffers hold, so that a COPY of it waits for room to write once the reading stops."""
    big = b'{"x": "%s"}' % (b"y" * 200_000)
    batch = [exchange(i) for i in range(40)]
    for ex in batch:
        ex.body = big
    return RowEncoder(RecordingConfig()).encode(batch)


async def test_a_copy_cut_behind_a_partition_leaves_no_driver_error_in_the_log(
        database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A batch larger than the socket's buffers, sent to a database that stopped reading it
    (a partition: nothing acknowledged), waits for room to write; the writer's timeout (or
    a stop's grace) cuts it and the batch is spooled. The driver's wait for the answer was
    then never collected, and asyncio logged `ERROR Future exception was never retrieved`
    with a traceback of asyncpg's ConnectionDoesNotExistError when it was freed, after the
    writer's own line had said what became of the batch."""
    rows = _larger_than_the_socket_buffers()
    async with DatabaseLink(database_url, stall=True) as link:
        writer = PostgresWriter(link.url, timeout=WRITER_TIMEOUT_S)
        try:
            await writer.write(*RowEncoder(RecordingConfig()).encode([exchange(0)]))
            link.freeze_on(b"COPY")
            with pytest.raises(DatabaseError, match="no answer from the database within 1 s"):
                await asyncio.wait_for(writer.write(*rows), 10)
        finally:
            await writer.close(0.2)
    del writer
    gc.collect()  # the proxy's collector frees such a cycle within a minute (cycles.py)
    await asyncio.sleep(0.05)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not said


async def test_a_cut_ends_a_copy_that_waits_for_room_to_write(database_url: str) -> None:
    """A COPY larger than the socket's buffers, to a database that stopped reading it (a
    partition; or a database too busy to keep up), waits on the driver's flow control for
    room to write. A cut (the writer's timeout, a stop's grace) ends it at once with the
    cut's reason: it aborted the connection but left that wait as it was, since neither
    asyncpg nor the loop lifts it for an aborted connection, and the COPY waited for ever,
    with the writer, a stop (the benchmark's harness killed such a proxy 8 s into its
    stop), and every batch behind it."""
    rows = _larger_than_the_socket_buffers()
    async with DatabaseLink(database_url, stall=True) as link:
        writer = PostgresWriter(link.url, timeout=120)  # only the cut below ends the wait
        copying: asyncio.Future[None] | None = None
        try:
            await writer.write(*RowEncoder(RecordingConfig()).encode([exchange(0)]))
            link.freeze_on(b"COPY")
            copying = asyncio.ensure_future(writer.write(*rows))
            await asyncio.wait_for(link.frozen.wait(), 10)
            await asyncio.sleep(0.5)  # the buffers fill up; the COPY waits for room
            assert not copying.done()
            writer.cut("the stop's grace ran out")
            # Not wait_for: its cancellation would end the wait too (asyncpg then fails the
            # COPY), which is not what a stop does with it.
            await asyncio.wait({copying}, timeout=10)
            assert copying.done(), "the COPY still waits for room to write after the cut"
            with pytest.raises(DatabaseError, match="the stop's grace ran out"):
                copying.result()
        finally:
            if copying is not None and not copying.done():
                copying.cancel()
                with contextlib.suppress(BaseException):
                    await copying
            await writer.close(0.2)


async def _interrupted_again_and_again(proc: asyncio.subprocess.Process) -> Result:
    """Ctrl-C, then Ctrl-C again every 10 ms until the command ends (an impatient
    operator): each of the command's last moments gets one."""
    proc.send_signal(signal.SIGINT)
    with contextlib.suppress(ProcessLookupError):  # it ended between two
        while proc.returncode is None:
            await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGINT)
    return await finish(proc, timeout=10)


async def test_ctrl_c_on_a_labels_import_stalled_mid_copy_ends_in_one_line(
        database_url: str, tmp_path: Path) -> None:
    """A labels file larger than the socket's buffers, sent to a database that stopped
    reading it (a partition), waits for room to write; Ctrl-C, pressed again and again,
    ends the import with exit status 130, nothing imported, and one line saying so. The
    command ended silently, or with the tracebacks of the KeyboardInterrupt that a Ctrl-C
    pressed again raised wherever the code was then (`Task exception was never
    retrieved` of asyncpg's cancel request, `Exception ignored in` a finaliser)."""
    labels = tmp_path / "labels.csv"
    with labels.open("w", encoding="utf-8") as fh:
        fh.write("request_id,label\n")
        fh.writelines(f"req-{i:08d},{'x' * 200}\n" for i in range(100_000))
    async with DatabaseLink(database_url, stall=True) as link:
        config = write_config(tmp_path, link.url)
        link.freeze_on(b"COPY")
        proc = await start_cli("labels", "import", "-c", str(config), str(labels))
        async with _killed_if_left(proc):
            await asyncio.wait_for(link.frozen.wait(), 30)
            await asyncio.sleep(0.3)
            assert proc.returncode is None  # waiting for room to write
            result = await _interrupted_again_and_again(proc)
    assert result.status == 130, result.err
    assert result.err == ("shadowproxy: interrupted: nothing was imported (the import is "
                          "one transaction, rolled back); run `shadowproxy labels import` "
                          "again\n")
    assert await fetchval(database_url, "SELECT count(*) FROM shadowproxy.labels") == 0
