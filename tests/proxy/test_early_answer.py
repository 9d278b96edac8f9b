"""A primary that answers while the request body still arrives (an early 413, a 504): the
client reads that answer, the rest of the body is dropped, and the upstream connection,
whose request was never completely sent, is not used again."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from tests.conftest import StartProxy, route
from tests.db import fetch
from tests.proxy.test_data_path import wait_for_rows
from tests.upstreams import closing, raw_server, unaccepting_listener

BODY = 200_000
LIMITS = {"max_mirror_body_bytes": 100_000}
TOO_LARGE = b'{"error": "body too large"}'


async def upload(port: int, pieces: int = 20, pause: float = 0.02,
                 timeout: float = 10) -> tuple[bytes, bytes]:
    """POST a 200 KB body in pieces; return the response head and everything after it,
    read until the proxy closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % BODY)
        with contextlib.suppress(ConnectionError):
            for _ in range(pieces):
                writer.write(b"u" * (BODY // pieces))
                await writer.drain()
                await asyncio.sleep(pause)

    sender = asyncio.create_task(send())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        rest = await asyncio.wait_for(reader.read(), timeout)
        await sender
    finally:
        sender.cancel()
        writer.close()
    return head, rest


def content_length(head: bytes) -> int:
    return int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")))


async def test_early_413_reaches_the_client_and_the_connection_is_not_reused(
        start_proxy: StartProxy, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A primary that answers 413 to the head of a streamed 200 KB upload and keeps its
    connection open: every client reads the 413 (and nothing else), no internal error is
    logged, and no upstream connection carries a second request."""
    heads: list[int] = []  # request heads read on each upstream connection

    @closing
    async def early_413(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(heads)
        heads.append(0)
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            heads[index] += 1
            writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(TOO_LARGE), TOO_LARGE))
            await writer.drain()
            # A server that keeps its connection reads the body it refused.
            await reader.readexactly(content_length(head))

    caplog.set_level(logging.ERROR, logger="shadowproxy")
    async with raw_server(early_413) as primary, \
            start_proxy([route(primary)], limits=LIMITS) as proxy:
        for _ in range(5):
            head, rest = await upload(proxy.port)
            assert head.startswith(b"HTTP/1.1 413"), head
            assert b"Connection: close" in head
            assert rest == TOO_LARGE  # the whole answer, then the end of the connection
        await wait_for_rows(database_url, "responses", 5)
    assert [r.getMessage() for r in caplog.records] == []
    assert heads == [1] * 5
    rows = await fetch(database_url, "SELECT status, error FROM shadowproxy.responses")
    assert [(r["status"], r["error"]) for r in rows] == [(413, None)] * 5


async def test_timeout_while_the_body_arrives_gives_504(
        start_proxy: StartProxy, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A primary that times out while the client still sends its body: the client reads
    the 504, the rest of its body is dropped, and the connection then closes."""
    @closing
    async def never_answers(reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass

    caplog.set_level(logging.ERROR, logger="shadowproxy")
    async with raw_server(never_answers) as primary, \
            start_proxy([{"name": "r", "primary": {"url": primary, "timeout_s": 0.3}}],
                        limits=LIMITS) as proxy:
        head, rest = await upload(proxy.port, pieces=20, pause=0.05)
        assert head.startswith(b"HTTP/1.1 504"), head
        assert len(rest) == content_length(head)
        assert b"did not answer in time" in rest
        await wait_for_rows(database_url, "responses", 1)
    assert [r.getMessage() for r in caplog.records] == []
    rows = await fetch(database_url, "SELECT error_kind FROM shadowproxy.responses")
    assert [r["error_kind"] for r in rows] == ["timeout"]


async def test_client_reading_pauses_while_the_primary_connection_is_made(
        start_proxy: StartProxy) -> None:
    """While the connection to the primary is not made, a streamed body is not read from
    the client beyond what one read brings: the client's writes block."""
    with unaccepting_listener() as primary:
        async with start_proxy([{"name": "r", "primary": {"url": primary, "timeout_s": 1.5}}],
                               limits=LIMITS) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: 50000000\r\n\r\n")
                writer.write(b"b" * 32_000_000)
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(writer.drain(), 1.0)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 504"), head
            finally:
                writer.transport.abort()


async def test_a_body_cut_short_by_an_early_answer_is_recorded_as_truncated(
        start_proxy: StartProxy, database_url: str) -> None:
    """What arrived of a streamed body before the primary's early 413 is recorded, well
    under `recording.max_body_bytes`, flagged truncated: it is not the request the client
    sent, and a replay must not send it as one. A body streamed whole is not flagged."""
    @closing
    async def early_413(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if b"/whole" in head:
                await reader.readexactly(content_length(head))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                continue
            writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(TOO_LARGE), TOO_LARGE))
            await writer.drain()
            await reader.readexactly(content_length(head))

    async with raw_server(early_413) as primary, \
            start_proxy([route(primary)], limits=LIMITS) as proxy:
        head, _ = await upload(proxy.port)
        assert head.startswith(b"HTTP/1.1 413"), head
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /whole HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (BODY, b"w" * BODY))
        assert (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()
        await wait_for_rows(database_url, "requests", 2)
    rows = await fetch(database_url, "SELECT path, body_size, length(body) AS kept, "
                                     "body_truncated FROM shadowproxy.requests ORDER BY path")
    cut, whole = rows
    assert (whole["path"], whole["body_size"], whole["kept"], whole["body_truncated"]) == (
        "/whole", BODY, BODY, False)
    assert cut["path"] == "/upload" and cut["body_size"] < BODY, dict(cut)
    assert cut["kept"] == cut["body_size"] and cut["body_truncated"], dict(cut)
