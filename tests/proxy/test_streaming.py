"""Large and streamed responses: chunked and server-sent events flow through as they arrive."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
from aiohttp import web

from tests.conftest import StartProxy, route
from tests.db import fetch, fetchrow, fetchval
from tests.proxy.test_data_path import wait_for_rows
from tests.upstreams import closing, raw_server, serve


async def test_server_sent_events_reach_the_client_as_they_are_sent(
        start_proxy: StartProxy, database_url: str) -> None:
    """Each SSE event arrives at the client before the upstream sends the next one."""
    release = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await asyncio.wait_for(release.wait(), 5)
        await resp.write(b"data: second\n\n")
        await resp.write_eof()
        return resp

    async with serve(events) as primary, start_proxy([route(primary.url)]) as proxy, \
            aiohttp.ClientSession() as http:
        resp = await http.get(f"http://127.0.0.1:{proxy.port}/stream")
        assert resp.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 3)
        assert first == b"data: first\n\n"
        release.set()
        rest = await resp.read()
        assert rest == b"data: second\n\n"
        await wait_for_rows(database_url, "responses", 1)
    body = await fetchval(database_url, "SELECT body FROM shadowproxy.responses")
    assert body == b"data: first\n\ndata: second\n\n"


async def test_the_head_of_a_stream_reaches_the_client_before_its_first_event(
        start_proxy: StartProxy, database_url: str) -> None:
    """A primary that sends its head at once and its first event later (a model working on
    its first token): the client has the head while the event is still to come."""
    release = asyncio.Event()

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(release.wait(), 5)
        writer.write(b"d\r\ndata: first\n\n\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()  # until the proxy closes

    async with raw_server(closing(respond)) as primary, \
            start_proxy([route(primary)]) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Transfer-Encoding: chunked\r\n" in head
        release.set()
        body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 3)
        assert body == b"d\r\ndata: first\n\n\r\n0\r\n\r\n"
        writer.close()
        await wait_for_rows(database_url, "responses", 1)
    body = await fetchval(database_url, "SELECT body FROM shadowproxy.responses")
    assert body == b"data: first\n\n"


async def test_large_chunked_response_is_streamed_and_capture_is_capped(
        start_proxy: StartProxy, database_url: str) -> None:
    """A 5 MB chunked body reaches the client whole; the record keeps the cap and a flag."""
    piece = bytes(range(256)) * 4096  # 1 MiB

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(5):
            await resp.write(piece)
        await resp.write_eof()
        return resp

    async with serve(big) as primary, \
            start_proxy([route(primary.url)], recording={"max_body_bytes": 10_000}) as proxy, \
            aiohttp.ClientSession() as http:
        resp = await http.get(f"http://127.0.0.1:{proxy.port}/big")
        data = await resp.read()
        assert data == piece * 5
        await wait_for_rows(database_url, "responses", 1)
    row = await fetchrow(database_url, "SELECT length(body) AS n, body_size, body_truncated "
                              "FROM shadowproxy.responses")
    assert (row["n"], row["body_size"], row["body_truncated"]) == (10_000, 5 * len(piece), True)


async def test_chunked_request_body_is_forwarded(start_proxy: StartProxy) -> None:
    """A chunked request body arrives at primary and shadow as the same bytes."""
    async def echo(request: web.Request) -> web.StreamResponse:
        return web.Response(body=await request.read())

    async def gen():  # type: ignore[no-untyped-def]
        for i in range(3):
            yield b"part%d;" % i

    async with serve(echo) as primary, serve(echo) as shadow, \
            start_proxy([route(primary.url, shadow.url)]) as proxy, \
            aiohttp.ClientSession() as http:
        resp = await http.post(f"http://127.0.0.1:{proxy.port}/e", data=gen())
        assert await resp.read() == b"part0;part1;part2;"
        for _ in range(50):
            if shadow.seen:
                break
            await asyncio.sleep(0.02)
    assert shadow.seen[0].body == b"part0;part1;part2;"


async def test_head_and_no_content_responses(start_proxy: StartProxy) -> None:
    """HEAD responses and 204s end without a body and keep the connection usable."""
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/empty":
            return web.Response(status=204)
        return web.Response(body=b"hello", content_type="text/plain")

    async with serve(handler) as primary, start_proxy([route(primary.url)]) as proxy, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        started = time.monotonic()
        resp = await http.head(f"http://127.0.0.1:{proxy.port}/x")
        assert resp.status == 200 and resp.headers["Content-Length"] == "5"
        resp = await http.get(f"http://127.0.0.1:{proxy.port}/empty")
        assert resp.status == 204
        resp = await http.get(f"http://127.0.0.1:{proxy.port}/x")
        assert await resp.read() == b"hello"
        assert time.monotonic() - started < 2


async def test_http10_client_gets_a_close_delimited_answer(start_proxy: StartProxy) -> None:
    """An HTTP/1.0 client gets the body and the end of the connection marks its end."""
    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"abc")
        await resp.write_eof()
        return resp

    async with serve(chunked) as primary, start_proxy([route(primary.url)]) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /x HTTP/1.0\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()
    assert body == b"abc"


async def test_a_body_after_a_head_that_came_just_in_time_gets_its_timeout(
        start_proxy: StartProxy, database_url: str) -> None:
    """``timeout_s`` bounds the wait for the head, then each wait between pieces of the
    body: a primary and a shadow whose head comes at 0.7 of it, on a new connection, and
    the first event 0.5 later (a model's first token) answer in full, not cut at 1.0."""
    events = b"data: first\n\ndata: second\n\n"

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.7)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(events))
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.write(events)
        await writer.drain()
        await reader.read()  # until the proxy closes

    async with raw_server(closing(respond)) as primary, raw_server(closing(respond)) as shadow:
        routes = [{**route(primary), "primary": {"url": primary, "timeout_s": 1},
                   "shadows": [{"name": "s1", "url": shadow, "timeout_s": 1}]}]
        async with start_proxy(routes) as proxy, aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{proxy.port}/stream") as resp:
                assert resp.status == 200
                assert await resp.read() == events
            await wait_for_rows(database_url, "responses", 2)
    rows = await fetch(database_url, "SELECT role, body, error FROM shadowproxy.responses "
                                     "ORDER BY role")
    assert [(r["role"], r["body"], r["error"]) for r in rows] == [
        ("primary", events, None), ("shadow", events, None)]


async def test_a_body_that_stops_is_cut_within_twice_its_timeout_after_its_last_byte(
        start_proxy: StartProxy, database_url: str) -> None:
    """The body's flow is checked once per ``timeout_s`` (docs/configuration.md): a primary
    that sends its head and a first piece, then nothing, is cut no sooner than
    ``timeout_s`` after that piece and no later than twice that (with slack for the loop);
    the client's connection is cut and the record says ``timeout``."""
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await reader.read()  # silent until the proxy closes

    async with raw_server(closing(respond)) as primary:
        routes = [{**route(primary), "primary": {"url": primary, "timeout_s": 0.6}}]
        async with start_proxy(routes) as proxy, aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{proxy.port}/stops") as resp:
                assert resp.status == 200
                assert await resp.content.readexactly(5) == b"first"
                last_byte = time.perf_counter()
                with contextlib.suppress(aiohttp.ClientPayloadError):
                    await asyncio.wait_for(resp.content.read(), 5)
                cut_after = time.perf_counter() - last_byte
            await wait_for_rows(database_url, "responses", 1)
    assert 0.6 <= cut_after <= 1.2 + 0.5, cut_after
    assert await fetchval(database_url, "SELECT error_kind FROM shadowproxy.responses") == \
        "timeout"
