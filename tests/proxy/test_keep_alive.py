"""Upstream keep-alive connections: each goes back to the pool once per complete response,
and never after bytes that nobody asked for, so that no client gets another's answer."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import StartProxy, route
from tests.db import fetch
from tests.proxy.test_data_path import wait_for_rows
from tests.upstreams import closing, raw_server, serve

KINDS = ("json", "204", "304", "head", "json", "204", "head", "304")


async def echo_id(request: web.Request) -> web.StreamResponse:
    """Answers carry the request's id: in X-Echo always, in the body when there is one."""
    rid = request.query["id"]
    kind = request.query["kind"]
    if kind in ("204", "304"):
        return web.Response(status=int(kind), headers={"X-Echo": rid})
    return web.json_response({"id": rid}, headers={"X-Echo": rid})


async def test_bodyless_answers_never_cross_between_clients(
        start_proxy: StartProxy, database_url: str) -> None:
    """With many 204, 304 and HEAD answers under 8 concurrent clients, every client gets its
    own answer and every record pairs the answers to its own request."""
    clients, per_client = 8, 40

    async def client(proxy_port: int, n: int) -> list[str]:
        wrong = []
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                         timeout=timeout) as http:
            for i in range(per_client):
                rid, kind = f"c{n}-{i}", KINDS[(n + i) % len(KINDS)]
                url = f"http://127.0.0.1:{proxy_port}/x?id={rid}&kind={kind}"
                try:
                    resp = await (http.head(url) if kind == "head" else http.get(url))
                    body = await resp.read()
                except (TimeoutError, aiohttp.ClientError) as exc:
                    wrong.append(f"{rid}: {type(exc).__name__}")
                    continue
                if resp.headers.get("X-Echo") != rid:
                    wrong.append(f"{rid}: got {resp.status} for {resp.headers.get('X-Echo')}")
                elif kind == "json" and body != b'{"id": "%s"}' % rid.encode():
                    wrong.append(f"{rid}: body {body[:40]!r}")
        return wrong

    async with serve(echo_id) as primary, serve(echo_id) as shadow, \
            start_proxy([route(primary.url, shadow.url)]) as proxy:
        results = await asyncio.gather(*(client(proxy.port, n) for n in range(clients)))
        assert [w for ws in results for w in ws] == []
        await wait_for_rows(database_url, "responses", 2 * clients * per_client)
    rows = await fetch(database_url, """
        SELECT q.query, r.role, r.status, r.headers->>'x-echo' AS echo
        FROM shadowproxy.requests q JOIN shadowproxy.responses r ON r.request = q.id""")
    mismatched = [(r["query"], r["role"], r["echo"]) for r in rows
                  if parse_qs(r["query"])["id"][0] != r["echo"]]
    assert mismatched == []
    assert sorted({r["role"] for r in rows}) == ["primary", "shadow"]


async def test_unsolicited_bytes_close_the_upstream_connection(start_proxy: StartProxy) -> None:
    """A second response nobody asked for, glued to the first or sent later, closes that
    connection: the next requests get their own answers on other connections."""
    connections = 0

    @closing
    async def extra_response(reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ")[1]
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path)
            extra = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra"
            if path.startswith(b"/glued"):
                writer.write(answer + extra)
            else:
                writer.write(answer)
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(extra)
            await writer.drain()

    async with raw_server(extra_response) as upstream, \
            start_proxy([route(upstream)]) as proxy, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{proxy.port}"
        for first in ("/glued-0", "/later-0"):
            assert await (await http.get(base + first)).read() == first.encode()
            await asyncio.sleep(0.2)
            paths = [f"/{first[1:-2]}-{i}" for i in range(1, 5)]
            answers = await asyncio.gather(*(http.get(base + p) for p in paths))
            assert [await a.read() for a in answers] == [p.encode() for p in paths]
    # Every answer was followed by an extra response, so no connection carried two requests.
    assert connections == 10


async def test_idle_upstream_connections_expire(start_proxy: StartProxy) -> None:
    """An upstream connection idle longer than limits.upstream_idle_s is not reused; one
    idle for less is."""
    connections = 0

    @closing
    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with raw_server(keep_alive) as upstream, \
            start_proxy([route(upstream)], limits={"upstream_idle_s": 0.3}) as proxy, \
            aiohttp.ClientSession() as http:
        for pause in (0, 0.05, 0.5, 0.05):
            await asyncio.sleep(pause)
            assert await (await http.get(f"http://127.0.0.1:{proxy.port}/")).read() == b"ok"
    assert connections == 2


async def test_requests_resent_on_a_closed_keep_alive_connection_only_when_safe(
        start_proxy: StartProxy) -> None:
    """A reused connection that closes before any byte of the response: a GET is sent
    again on a new connection, a POST is not (502) unless its route opts in."""
    seen: list[str] = []

    @closing
    async def one_answer_per_connection(reader: asyncio.StreamReader,
                                        writer: asyncio.StreamWriter) -> None:
        # Answers the first request of each connection, then closes on reading the second,
        # as a server does when its keep-alive timeout and the next request cross.
        for answered in (True, False):
            head = await reader.readuntil(b"\r\n\r\n")
            method, path = head.split(b" ")[:2]
            seen.append(f"{method.decode()} {path.decode()}")
            length = int(head.lower().partition(b"content-length: ")[2].split(b"\r\n")[0]
                         or 0)
            await reader.readexactly(length)
            if answered:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()

    async with raw_server(one_answer_per_connection) as upstream, \
            start_proxy([route(upstream, name="plain", match={"path_prefix": "/plain"}),
                         route(upstream, name="opted", match={"path_prefix": "/opted"},
                               retry_non_idempotent=True)]) as proxy, \
            aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{proxy.port}"

        async def status(method: str, path: str) -> int:
            async with http.request(method, base + path, data=b"{}") as resp:
                await resp.read()
                return resp.status

        assert await status("GET", "/plain/1") == 200
        assert await status("POST", "/plain/2") == 502
        assert await status("GET", "/plain/3") == 200
        assert await status("GET", "/plain/4") == 200
        assert await status("GET", "/opted/5") == 200
        assert await status("POST", "/opted/6") == 200
    # Both routes share the upstream's pool: each request after the first on a connection
    # meets the closing server.
    assert seen == ["GET /plain/1", "POST /plain/2", "GET /plain/3", "GET /plain/4",
                    "GET /plain/4", "GET /opted/5", "GET /opted/5", "POST /opted/6",
                    "POST /opted/6"]


async def test_uvicorn_keep_alive_timeout_never_meets_a_reused_connection(
        start_proxy: StartProxy) -> None:
    """Against a real uvicorn upstream (keep-alive timeout 1 s), POSTs after pauses on
    either side of limits.upstream_idle_s (0.5 s) all succeed and each reaches the upstream
    once; after the longer pauses a new connection carries them."""
    uvicorn = pytest.importorskip("uvicorn")
    seen: list[tuple[str, int]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        pieces = []
        while True:
            message = await receive()
            pieces.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(pieces)
        seen.append((json.loads(body)["id"], scope["client"][1]))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})

    config = uvicorn.Config(app, host="127.0.0.1", port=0, timeout_keep_alive=1,
                            log_level="warning", lifespan="off", ws="none",
                            http="httptools", proxy_headers=False)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        pauses = (0, 0.05, 0.7, 0.05, 1.3, 0.05, 0.7)
        async with start_proxy([route(f"http://127.0.0.1:{port}")],
                               limits={"upstream_idle_s": 0.5}) as proxy, \
                aiohttp.ClientSession() as http:
            for i, pause in enumerate(pauses):
                await asyncio.sleep(pause)
                resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", json={"id": str(i)})
                assert resp.status == 200, await resp.text()
                await resp.read()
    finally:
        server.should_exit = True
        await serving
    assert [rid for rid, _ in seen] == [str(i) for i in range(len(pauses))]
    ports = [port for _, port in seen]  # the proxy's end of each upstream connection
    new_connection = [i == 0 or ports[i] != ports[i - 1] for i in range(len(ports))]
    assert new_connection == [pause == 0 or pause > 0.5 for pause in pauses]


@pytest.mark.parametrize(("answer", "reused"), [
    (b"HTTP/1.1 200 OK\r\nX-A: b\r\n\r\n", True),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", False),
    (b"HTTP/1.0 200 OK\r\n\r\n", False),
], ids=["1.1", "1.0-keep-alive", "close", "1.0"])
async def test_a_head_answer_without_a_length_keeps_its_connection(
        start_proxy: StartProxy, answer: bytes, reused: bool) -> None:
    """A HEAD answer has no body whatever its headers say (RFC 9112 §6.3): one with neither
    Content-Length nor Transfer-Encoding leaves the primary's and the shadow's connections
    open for the next request, unless its version or Connection says otherwise."""
    connections = {"primary": 0, "shadow": 0}

    def upstream(name: str) -> Any:
        @closing
        async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections[name] += 1
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer)
                await writer.drain()

        return respond

    async with raw_server(upstream("primary")) as primary, \
            raw_server(upstream("shadow")) as shadow, \
            start_proxy([route(primary, shadow)]) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            for _ in range(3):
                writer.write(b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
                await asyncio.sleep(0.2)  # the shadow's answer is in too
        finally:
            writer.close()
    assert connections == ({"primary": 1, "shadow": 1} if reused
                           else {"primary": 3, "shadow": 3})
