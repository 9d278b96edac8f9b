"""Hostile and odd input: the client gets the primary's answer or a clear 4xx/5xx, the
process keeps serving, and nothing already accepted is lost."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import struct

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import StartProxy, route
from tests.db import fetch, fetchrow
from tests.proxy.test_data_path import wait_for_rows
from tests.upstreams import closing, model, raw_server, serve


async def exchange_raw(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes, return everything the proxy answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def still_serving(port: int) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"http://127.0.0.1:{port}/p", json={"features": {"a": 1}})
        assert resp.status == 200


async def test_request_smuggling_attempts_are_refused(start_proxy: StartProxy) -> None:
    """Content-Length with Transfer-Encoding, or two Content-Lengths, get 400 and a close."""
    async with serve(model("v1")) as primary, start_proxy([route(primary.url)]) as proxy:
        both = (b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n")
        twice = (b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 40\r\n"
                 b"\r\nabc")
        obfuscated = (b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n"
                      b"0\r\n\r\n")
        for attack in (both, twice, obfuscated):
            answer = await exchange_raw(proxy.port, attack)
            assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
            assert b"Connection: close" in answer
        await still_serving(proxy.port)
    # Only the well-formed request after the attacks reached the primary: nothing smuggled.
    assert [(s.method, s.path) for s in primary.seen] == [("POST", "/p")]


async def test_oversized_headers_get_431(start_proxy: StartProxy) -> None:
    """A request head over limits.max_header_bytes gets 431 and is not forwarded."""
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url)], limits={"max_header_bytes": 4096}) as proxy:
        answer = await exchange_raw(
            proxy.port, b"GET /p HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 431")
        await still_serving(proxy.port)
    assert len(primary.seen) == 1


async def test_slow_body_client_gets_408_and_others_are_served(start_proxy: StartProxy) -> None:
    """A client sending its body slower than client_timeout_s gets 408; others are served."""
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url)], limits={"client_timeout_s": 1}) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        await still_serving(proxy.port)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408")
    assert len(primary.seen) == 1  # the incomplete request never reached the primary


async def test_client_disconnecting_mid_request_and_mid_response(
        start_proxy: StartProxy, database_url: str) -> None:
    """A client gone before its body ends is not forwarded; one gone mid-response is recorded."""
    chunk = b"z" * 65536

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            for _ in range(2000):
                await resp.write(chunk)
                await asyncio.sleep(0.001)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
        return resp

    async with serve(endless) as primary, start_proxy([route(primary.url)]) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nhalf")
        await asyncio.sleep(0.1)
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readexactly(200_000)
        writer.close()
        await wait_for_rows(database_url, "responses", 1)
        assert len(primary.seen) == 1
    row = await fetchrow(database_url, "SELECT status, error FROM shadowproxy.responses")
    assert row["status"] == 200 and row["error"] == "closed: client disconnected"


async def test_gzip_bomb_response_is_passed_through_and_not_inflated(
        start_proxy: StartProxy, database_url: str) -> None:
    """A response that inflates to 200 MB reaches the client as bytes; no jsonb is made."""
    bomb = gzip.compress(b'{"a": "' + b"0" * 200_000_000 + b'"}', compresslevel=9)

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip",
                                                "Content-Type": "application/json"})

    async with serve(handler) as primary, \
            start_proxy([route(primary.url)],
                        recording={"max_body_bytes": 2_000_000}) as proxy, \
            aiohttp.ClientSession(auto_decompress=False) as http:
        resp = await http.get(f"http://127.0.0.1:{proxy.port}/bomb")
        assert await resp.read() == bomb
        await wait_for_rows(database_url, "responses", 1)
    row = await fetchrow(database_url, "SELECT body_json, body_size FROM shadowproxy.responses")
    assert row["body_json"] is None and row["body_size"] == len(bomb)


async def test_malformed_or_truncated_upstream_responses_give_502(
        start_proxy: StartProxy, database_url: str) -> None:
    """Garbage from the primary, or a response cut short, gives the client a JSON 502."""
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n")
        await writer.drain()
        await reader.read()  # until the proxy hangs up
        writer.close()

    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly a part")
        await writer.drain()
        writer.close()

    async def silent_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async with raw_server(garbage) as bad, raw_server(silent_close) as closing, \
            raw_server(truncated) as cut, \
            start_proxy([route(bad, name="bad", match={"path_prefix": "/bad"}),
                         route(closing, name="closing", match={"path_prefix": "/closing"}),
                         route(cut, name="cut", match={"path_prefix": "/cut"})]) as proxy, \
            aiohttp.ClientSession() as http:
        for path, says in (("/bad", "cannot be relayed"), ("/closing", "could not be reached")):
            resp = await http.get(f"http://127.0.0.1:{proxy.port}{path}")
            assert resp.status == 502
            assert says in (await resp.json())["error"]
        # Cut after the head was sent: the only signal left is closing the connection.
        try:
            resp = await http.get(f"http://127.0.0.1:{proxy.port}/cut")
            await resp.read()
            raise AssertionError("a truncated body must not look complete")
        except aiohttp.ClientPayloadError:
            pass
        await wait_for_rows(database_url, "responses", 3)
    rows = await fetch(database_url, "SELECT error, error_kind FROM shadowproxy.responses")
    assert sorted(r["error"].split(":")[0] for r in rows) == [
        "closed", "closed", "malformed response"]
    assert sorted(r["error_kind"] for r in rows) == ["closed", "closed", "protocol"]


async def test_shadow_answering_10_mb_is_capped_and_harmless(
        start_proxy: StartProxy, database_url: str) -> None:
    """A shadow's 10 MB answer is captured up to the cap; the client never sees it."""
    async def huge(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"[" + b"1," * 5_000_000 + b"1]",
                            content_type="application/json")

    async with serve(model("v1")) as primary, serve(huge) as shadow, \
            start_proxy([route(primary.url, shadow.url)],
                        recording={"max_body_bytes": 100_000}) as proxy, \
            aiohttp.ClientSession() as http:
        resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", json={"features": {"a": 2}})
        assert (await resp.json())["prediction"] == 2
        await wait_for_rows(database_url, "responses", 2)
    row = await fetchrow(database_url, "SELECT length(body) AS n, body_size, body_truncated "
                              "FROM shadowproxy.responses WHERE role = 'shadow'")
    assert (row["n"], row["body_size"], row["body_truncated"]) == (100_000, 10_000_003, True)


async def test_absolute_form_and_host_never_choose_the_upstream(start_proxy: StartProxy) -> None:
    """An absolute-form URL or a foreign Host header still goes to the configured primary."""
    async with serve(model("v1")) as primary, start_proxy([route(primary.url)]) as proxy:
        answer = await exchange_raw(
            proxy.port, b"GET http://169.254.169.254/latest/meta-data?x=1 HTTP/1.1\r\n"
                        b"Host: 169.254.169.254\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200")
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["model_version"] == "v1"
    assert primary.seen[0].path == "/latest/meta-data"
    assert primary.seen[0].query == "x=1"
    assert primary.seen[0].headers["host"] == primary.url.removeprefix("http://")


async def test_websocket_upgrade_is_refused_clearly(start_proxy: StartProxy) -> None:
    """An Upgrade request gets 501 rather than a half-working tunnel."""
    async with serve(model("v1")) as primary, start_proxy([route(primary.url)]) as proxy:
        answer = await exchange_raw(
            proxy.port, b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 501")
        await still_serving(proxy.port)


async def test_client_pipelining_without_reading_is_held_back(start_proxy: StartProxy) -> None:
    """A client that pipelines 3,000 requests and never reads: only the requests its socket
    buffers make room for run (backpressure holds past the primary's timeout_s), and after
    limits.client_timeout_s without progress the connection is dropped; others are served."""
    answer = b"a" * 65536

    async def big(request: web.Request) -> web.StreamResponse:
        return web.Response(body=answer)

    async with serve(big) as primary, \
            start_proxy([{"name": "r", "primary": {"url": primary.url, "timeout_s": 0.5}}],
                        limits={"client_timeout_s": 2}) as proxy:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", proxy.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n" * 3000)
        await asyncio.sleep(1.5)  # three times the primary's timeout_s
        held = len(primary.seen)
        assert held <= 100, held
        await still_serving(proxy.port)
        await asyncio.sleep(1.5)  # past client_timeout_s: the stalled client is let go
        assert len(primary.seen) <= held + 2
        try:
            with pytest.raises(ConnectionError):
                for _ in range(1000):  # what the buffers hold, then the end
                    if not await reader.read(1 << 20):
                        raise ConnectionResetError
        finally:
            writer.close()


async def test_upstream_response_heads_are_capped(
        start_proxy: StartProxy, database_url: str) -> None:
    """A primary sending 10,000 response headers gives the client a 502; a shadow that
    keeps sending header lines fails at the cap long before its timeout_s; both are
    recorded as protocol errors."""
    @closing
    async def many_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n" + b"".join(
            b"X-Header-%d: some value\r\n" % i for i in range(10_000))
                     + b"Content-Length: 2\r\n\r\n{}")
        await writer.drain()

    @closing
    async def endless_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(1_000_000):
            writer.write(b"X-More-%d: %s\r\n" % (i, b"v" * 100))
            await writer.drain()
            await asyncio.sleep(0.0005)

    async with raw_server(many_headers) as primary, raw_server(endless_head) as shadow, \
            start_proxy([{"name": "r", "primary": {"url": primary},
                          "shadows": [{"name": "s1", "url": shadow, "timeout_s": 3}]}]
                        ) as proxy, aiohttp.ClientSession() as http:
        resp = await http.get(f"http://127.0.0.1:{proxy.port}/x")
        assert resp.status == 502
        assert "larger than 65536 bytes" in (await resp.json())["error"]
        await wait_for_rows(database_url, "responses", 2)
    rows = await fetch(database_url, "SELECT role, status, error_kind, latency_ms "
                                     "FROM shadowproxy.responses ORDER BY role")
    assert [(r["role"], r["status"], r["error_kind"]) for r in rows] == [
        ("primary", None, "protocol"), ("shadow", None, "protocol")]
    assert rows[1]["latency_ms"] < 2000


async def test_request_trailers_never_become_headers(
        start_proxy: StartProxy, database_url: str) -> None:
    """Trailers of a chunked request (Authorization, X-Injected, X-Request-Id) reach no
    upstream as headers and are not recorded, whether the body is held or streamed."""
    async def echo(request: web.Request) -> web.StreamResponse:
        return web.Response(body=await request.read())

    trailers = (b"0\r\nAuthorization: Bearer from-trailer\r\nX-Injected: yes\r\n"
                b"X-Request-Id: from-trailer\r\n\r\n")
    small = b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" \
            b"5\r\nhello\r\n" + trailers
    large = b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" \
            b"%x\r\n%s\r\n" % (2000, b"L" * 2000) + trailers
    async with serve(echo) as primary, serve(echo) as shadow, \
            start_proxy([route(primary.url, shadow.url)],
                        limits={"max_mirror_body_bytes": 1000}) as proxy:
        for request, body in ((small, b"hello"), (large, b"L" * 2000)):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200"), head
                assert b"from-trailer" not in head
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                assert await reader.readexactly(length) == body
            finally:
                writer.close()
        await wait_for_rows(database_url, "responses", 4)  # the skipped shadow has a row
    for seen in (*primary.seen, *shadow.seen):
        assert "authorization" not in seen.headers and "x-injected" not in seen.headers
        assert seen.headers["x-request-id"] != "from-trailer"
    assert len(primary.seen) == 2 and len(shadow.seen) == 1
    rows = await fetch(database_url, "SELECT request_id, headers::text AS h "
                                     "FROM shadowproxy.requests")
    assert len(rows) == 2
    for row in rows:
        assert row["request_id"] != "from-trailer"
        assert "x-injected" not in row["h"] and "authorization" not in row["h"]


async def test_one_endless_header_line_gets_431(start_proxy: StartProxy) -> None:
    """A request head that never ends, in a single header line sent piece by piece, gets
    431 once it passes limits.max_header_bytes (the parser holds an unfinished line)."""
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url)], limits={"max_header_bytes": 4096}) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)

        async def answer() -> bytes:
            out = bytearray()
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(65536):
                    out += chunk
            return bytes(out)

        answered = asyncio.create_task(answer())
        try:
            writer.write(b"GET /p HTTP/1.1\r\nHost: x\r\nX-Long: ")
            with contextlib.suppress(ConnectionError):
                for _ in range(100):
                    writer.write(b"a" * 1024)
                    await writer.drain()
                    await asyncio.sleep(0.01)
            assert (await asyncio.wait_for(answered, 5)).startswith(b"HTTP/1.1 431")
        finally:
            answered.cancel()
            writer.close()
        await still_serving(proxy.port)


async def test_lenient_request_framing_is_refused(start_proxy: StartProxy) -> None:
    """Requests the parser would take but that are not clean HTTP/1.1 get 400 and a close,
    and nothing reaches the primary: no Host or two Host headers on HTTP/1.1, a transfer
    coding before chunked, an HTTP/0.9 line followed by headers, an HTTP/2.0 request line."""
    async with serve(model("v1")) as primary, start_proxy([route(primary.url)]) as proxy:
        for request, says in (
                (b"GET /p HTTP/1.1\r\n\r\n", b"needs a Host header"),
                (b"GET /p HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"more than one Host"),
                (b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                 b"0\r\n\r\n", b"only chunked"),
                (b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"only chunked"),
                (b"GET /p\r\nHost: x\r\n\r\n", b"HTTP/0.9"),
                (b"GET /p HTTP/2.0\r\nHost: x\r\n\r\n", b"HTTP/2.0")):
            answer = await exchange_raw(proxy.port, request)
            assert answer.startswith(b"HTTP/1.1 400"), (request, answer[:80])
            assert b"Connection: close" in answer and says in answer, answer
        await still_serving(proxy.port)
        answer = await exchange_raw(proxy.port, b"GET /p HTTP/1.0\r\n\r\n")  # 1.0: no Host
        assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
    assert len(primary.seen) == 2


async def test_upstream_switching_protocols_is_a_protocol_failure(
        start_proxy: StartProxy, database_url: str) -> None:
    """A primary or shadow answering 101: the client gets a 502, and both calls are
    recorded as protocol failures that say why."""
    @closing
    async def switching(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\n\x81\x05hello")
        await writer.drain()
        await reader.read()

    async with raw_server(switching) as upstream, \
            start_proxy([route(upstream, upstream)]) as proxy, aiohttp.ClientSession() as http:
        resp = await http.get(f"http://127.0.0.1:{proxy.port}/x")
        assert resp.status == 502
        assert "101 Switching Protocols" in (await resp.json())["error"]
        await wait_for_rows(database_url, "responses", 2)
    rows = await fetch(database_url, "SELECT role, status, error_kind, error "
                                     "FROM shadowproxy.responses ORDER BY role")
    assert [(r["role"], r["status"], r["error_kind"]) for r in rows] == [
        ("primary", None, "protocol"), ("shadow", None, "protocol")]
    assert all("101 Switching Protocols" in r["error"] for r in rows)


async def test_a_stream_whose_client_left_before_it_began_is_stopped(
        start_proxy: StartProxy, database_url: str) -> None:
    """A chat client's stop button pressed before the first token: the client is gone
    (reset) when the primary's event stream begins. The stream is stopped once its head is
    in, as one the client leaves mid-way is, and recorded as cut; it ran on to its end (an
    endless one for ever), the model generating for nobody and the primary's connection
    held. An answer with a length, which ends, is still read to its end and recorded."""
    ended = asyncio.Event()

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.3)  # the time to the first token
        if b" /v1/sized " in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(b"world")
            await writer.drain()
            await reader.read()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(200):  # 10 s of events
                writer.write(b"d\r\ndata: token\n\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)
        except ConnectionError:
            ended.set()

    async def leave(port: int, path: bytes) -> None:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        await asyncio.sleep(0.1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()  # with a reset: the proxy's side is gone at once

    async with raw_server(closing(stream)) as url, start_proxy([route(url)]) as proxy:
        await leave(proxy.port, b"/v1/chat")
        await asyncio.wait_for(ended.wait(), 3)
        await leave(proxy.port, b"/v1/sized")
        await wait_for_rows(database_url, "responses", 2)
    rows = await fetch(database_url, "SELECT q.path, r.status, r.error, r.body_size "
                                     "FROM shadowproxy.responses r JOIN shadowproxy.requests q "
                                     "ON q.id = r.request ORDER BY q.path")
    assert [tuple(r.values()) for r in rows] == [
        ("/v1/chat", 200, "closed: client disconnected", rows[0]["body_size"]),
        ("/v1/sized", 200, None, 10)]
