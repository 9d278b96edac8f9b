"""Upstream keep-alive connections: each goes back to the pool once per complete response,
and never after bytes that nobody asked for, so that no client gets another's answer."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web

from tests.conftest import StartProxy, route
from tests.db import fetch
from tests.proxy.test_data_path import wait_for_rows
from tests.upstreams import raw_server, serve

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

    async def extra_response(reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
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
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

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
