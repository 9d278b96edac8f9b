"""Stop order of one proxy process: accepting, requests, shadow calls, records, pools, admin."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg

from shadowproxy.app import STOP_STEPS
from shadowproxy.config import RecordingConfig
from shadowproxy.recorder.rows import RowEncoder
from shadowproxy.recorder.spool import Spool, frame_bytes, frames
from tests.conftest import StartProxy
from tests.db import execute, fetchval
from tests.recorder.exchanges import exchange
from tests.test_run_command import start as start_run
from tests.test_run_command import wait_ready
from tests.test_run_command import write_config as write_run_config
from tests.upstreams import model, serve, sleeping


async def test_stop_runs_in_order_and_admin_answers_until_the_end(
        start_proxy: StartProxy, database_url: str) -> None:
    """A stop answers the in-flight request and waits for its shadow call, flushes the record,
    then closes pools and the admin listener last: /healthz answers 200 throughout the drain
    and /readyz says 503 from its first step."""
    polls: list[tuple[float, str, int | str]] = []
    answered_at = 0.0
    async with serve(sleeping(0.6, model("v1"))) as primary, \
            serve(sleeping(1.2, model("v2"))) as shadow, aiohttp.ClientSession() as http:
        routes = [{"name": "r", "primary": {"url": primary.url},
                   "shadows": [{"name": "s", "url": shadow.url}]}]
        async with start_proxy(routes, limits={"shutdown_grace_s": 5}) as proxy:
            admin = f"http://127.0.0.1:{proxy.admin_port}"

            async def client() -> int:
                nonlocal answered_at
                resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", json={})
                await resp.read()
                answered_at = time.monotonic()
                return resp.status

            async def poll() -> None:
                while True:
                    for path in ("/healthz", "/readyz"):
                        try:
                            async with aiohttp.ClientSession() as fresh:
                                got = await fresh.get(admin + path)
                                polls.append((time.monotonic(), path, got.status))
                        except aiohttp.ClientError as exc:
                            polls.append((time.monotonic(), path, type(exc).__name__))
                    await asyncio.sleep(0.05)

            request = asyncio.ensure_future(client())
            await asyncio.sleep(0.2)  # the request is at the primary
            poller = asyncio.ensure_future(poll())
            stop_at = time.monotonic()
        # The block exited: the stop has run to its end.
        poller.cancel()
        # Its last poll may be mid-connection: let it close its session within the test.
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        status = await request
        steps = proxy.stopped
    assert status == 200
    assert steps == list(STOP_STEPS)
    assert answered_at > stop_at
    # Until the shadow call ended (about 1 s after the stop began), admin kept answering.
    during = [(path, got) for t, path, got in polls if stop_at < t < stop_at + 0.9]
    assert {got for path, got in during if path == "/healthz"} == {200}
    assert {got for path, got in during if path == "/readyz"} == {503}
    # The shadow's answer was waited for and flushed before the pools closed.
    assert int(await fetchval(database_url, "SELECT count(*) FROM shadowproxy.responses "
                                            "WHERE target = 's' AND status = 200")) == 1


async def test_a_connection_taken_while_draining_without_a_request_is_closed(
        start_proxy: StartProxy) -> None:
    """A connection the loop takes after the stop began (the kernel accepted it before the
    listener closed) and that sends nothing is closed rather than left open past the stop."""
    async with serve(model("v1")) as primary, \
            start_proxy([{"name": "r", "primary": {"url": primary.url}}]) as proxy:
        proxy.ctx.draining = True  # the listener is still open: the late connection's window
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            assert await asyncio.wait_for(reader.read(), 2) == b""
        finally:
            writer.close()
            await writer.wait_closed()
        assert not proxy.ctx.connections


REQUEST = (b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
           b"Content-Length: 2\r\n\r\n{}")


async def test_a_request_the_kernel_holds_when_the_stop_begins_is_answered(
        start_proxy: StartProxy) -> None:
    """A request that reached the proxy's socket before the stop began, on a connection it
    had accepted, but that its loop had not read yet, is answered: the stop closes the idle
    connections only once the loop has read what they already sent."""
    async with serve(model("v1")) as primary, \
            start_proxy([{"name": "r", "primary": {"url": primary.url}}]) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            for _ in range(200):  # the proxy's loop takes the connection
                if proxy.ctx.connections:
                    break
                await asyncio.sleep(0.01)
            # On loopback the bytes are in the proxy's socket when write() returns (an empty
            # buffer is sent at once); the stop begins before the loop runs again, and its
            # steps up to the last calls' end run without waiting when nothing is busy.
            writer.write(REQUEST)
            await proxy.drain(2.0)
            answer = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
            await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
    assert b'"model_version": "v1"' in answer


async def test_a_connection_taken_while_draining_with_its_request_sent_is_answered(
        start_proxy: StartProxy) -> None:
    """A connection the kernel accepted before the listener closed, taken by the loop after
    the stop began, whose request is already there, is answered and then closed."""
    async with serve(model("v1")) as primary, \
            start_proxy([{"name": "r", "primary": {"url": primary.url}}]) as proxy:
        proxy.ctx.draining = True  # the listener is still open: the late connection's window
        # Connected and sent without a turn of the loop: the request is in the socket before
        # the proxy's loop takes the connection.
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        sock.sendall(REQUEST)
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            answer = await asyncio.wait_for(reader.read(), 5)  # to the close after it
        finally:
            writer.close()
            await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:80]


_SPOOLED = 2000


def write_spool(data_dir: str) -> None:
    """A spool of ``_SPOOLED`` records left by a process that has ended (run in one)."""
    spool = Spool(Path(data_dir) / "spool", 1 << 30)
    encoder = RowEncoder(RecordingConfig())
    for start in range(0, _SPOOLED, 500):
        requests, responses = encoder.encode([exchange(i) for i in range(start, start + 500)])
        assert spool.append_frames([frame_bytes(p) for p in frames(requests, responses)])
    spool.close()


async def test_a_stop_during_the_spool_replay_does_not_call_a_slow_database_unreachable(
        tmp_path: Path, database_url: str) -> None:
    """SIGTERM while the spool is being stored into a database that is well, only slower
    than the grace: the write on its way is cut, the exit status is 0, and the log says
    the grace ran out and where the records wait, and nothing about an outage (it said
    `database not reachable (...); records go to the spool ... when it is back`); the next
    start stores every record once."""
    data_dir = tmp_path / "data"
    subprocess.run([sys.executable, "-c", "from tests.test_stop_order import write_spool; "
                    f"write_spool({str(data_dir)!r})"], check=True, timeout=60)
    conn = await asyncpg.connect(database_url)
    try:  # every write takes a second: one is on its way when the grace runs out
        await conn.execute("""
            CREATE FUNCTION public.slow_down() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$;
            CREATE TRIGGER slow_down AFTER INSERT ON shadowproxy.requests
                FOR EACH STATEMENT EXECUTE FUNCTION public.slow_down()""")
    finally:
        await conn.close()
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow:
        config, _, admin = write_run_config(tmp_path, primary.url, shadow.url, database_url,
                                            limits={"shutdown_grace_s": 0.5})
        proc = await start_run(config)
        try:
            await wait_ready(admin, proc)
            await asyncio.sleep(0.2)  # the replay's first write on its way
            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            took = time.monotonic() - began
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
        assert took < 0.5 + 2, took
        assert "draining (grace 0.5s)" in err
        assert ("the stop's grace (limits.shutdown_grace_s) ran out while a batch was on its "
                "way to the database (no answer from the database within the stop's grace "
                "(limits.shutdown_grace_s)): the records it has not taken wait in the spool "
                f"in {data_dir / 'spool'}, and the next start stores them") in err, err
        assert "not reachable" not in err, err
        assert list((data_dir / "spool").glob("*.spool"))
        await execute(database_url, "DROP TRIGGER slow_down ON shadowproxy.requests")
        proc = await start_run(config)
        try:
            await wait_ready(admin, proc)
            for _ in range(200):
                if not list((data_dir / "spool").glob("*.spool")):
                    break
                await asyncio.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert await fetchval(database_url, "SELECT count(*) FROM shadowproxy.requests") == _SPOOLED
    assert await fetchval(database_url,
                          "SELECT count(DISTINCT id) FROM shadowproxy.requests") == _SPOOLED
