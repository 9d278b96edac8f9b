"""Real HTTP upstreams on 127.0.0.1 for tests: model-like services, slow, hung and broken ones."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    url: str
    seen: list[Seen] = field(default_factory=list)


@asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free port of 127.0.0.1; its base URL."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[Upstream]:
    """Serve ``handler`` for every path on a free port; record what it received."""
    upstream = Upstream(url="")

    async def recording(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        upstream.seen.append(Seen(request.method, request.path, request.query_string,
                                  {k.lower(): v for k, v in request.headers.items()}, body))
        return await handler(request)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", recording)
    async with serve_app(app) as url:
        upstream.url = url
        yield upstream


def model(name: str, scale: float = 1.0) -> Handler:
    """A JSON model: prediction = scale * sum of the request's numeric features."""

    async def handler(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        features: dict[str, Any] = {}
        if raw:
            try:
                features = json.loads(raw).get("features", {})
            except (ValueError, AttributeError):
                return web.json_response({"error": "bad json"}, status=400)
        total = sum(v for v in features.values() if isinstance(v, int | float))
        status = int(request.query.get("status", "200"))
        payload = {"prediction": scale * total, "model_version": name}
        if request.query.get("gzip"):
            return web.Response(body=gzip.compress(json.dumps(payload).encode()),
                                status=status, content_type="application/json",
                                headers={"Content-Encoding": "gzip"})
        return web.json_response(payload, status=status)

    return handler


def sleeping(seconds: float, then: Handler | None = None) -> Handler:
    """Answer after ``seconds`` (a slow model), like ``then`` or with a small JSON body."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        if then is not None:
            return await then(request)
        return web.json_response({"prediction": 0.0, "slow": True})

    return handler


def hanging() -> Handler:
    """Never answer (until the test ends)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3600)
        return web.Response()

    return handler


@asynccontextmanager
async def raw_server(respond: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                       Awaitable[None]]) -> AsyncIterator[str]:
    """A TCP server speaking whatever ``respond`` writes (malformed HTTP, early close)."""
    writers: list[asyncio.StreamWriter] = []

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await respond(reader, writer)

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        # Handlers may still be sleeping; don't wait for them, but close their connections
        # now: one left open outlives the test's loop, and the garbage collector's warning
        # about its unclosed transport would fail whichever test it happens in.
        for writer in writers:
            writer.close()


@contextmanager
def unaccepting_listener() -> Iterator[str]:
    """The URL of a port whose accept queue is full and that never accepts: connection
    attempts hang (the kernel drops the SYNs) until the caller gives up, as with a dead
    host or a firewall that drops packets."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):  # the first fills the queue, the others hang
        filler = socket.socket()
        filler.setblocking(False)
        with suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for sock in (*fillers, server):
            sock.close()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def closing(respond: RawHandler) -> RawHandler:
    """``respond`` for ``raw_server``, ended quietly when the proxy hangs up, and its
    connection always closed (so that no stream outlives the test's event loop)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await respond(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return handler
