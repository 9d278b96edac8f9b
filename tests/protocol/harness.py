"""Both protocols of the data path, fed bytes in-process through a transport stand-in.

``FakeTransport`` records what a protocol writes and whether it paused, closed or aborted
(as uvicorn's test suite does with its mock transport). ``Harness`` builds one route whose
primary pool holds upstream connections on fake transports, so that a test plays the
client and the upstream byte by byte, with no socket and no server.
"""

from __future__ import annotations

import asyncio
from typing import Any

from shadowproxy.config import Settings
from shadowproxy.metrics import Metrics
from shadowproxy.models import Exchange
from shadowproxy.proxy import ClientConnection, CompiledRoute, ProxyContext
from shadowproxy.reload import config_version
from shadowproxy.routing import Router
from shadowproxy.upstream import UpstreamConnection, UpstreamPool


class FakeTransport(asyncio.Transport):
    """Records writes, pauses and closes; delivers nothing by itself."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.reading = True
        self.closed = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closed:
            self.written += data

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def take(self) -> bytes:
        """Everything written since the last call."""
        out = bytes(self.written)
        self.written.clear()
        return out

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


class Sink:
    """Where finished exchanges go instead of the recorder."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    def submit(self, exchange: Exchange) -> None:
        self.exchanges.append(exchange)


class Harness:
    """One route ``r`` to a primary whose connections are fake; clients on fake sockets."""

    def __init__(self, *, limits: dict[str, Any] | None = None, **route: Any) -> None:
        settings = Settings.model_validate({
            "limits": limits or {},
            "routes": [{"name": "r", "primary": {"url": "http://model.test:8000"}, **route}],
        })
        loop = asyncio.get_running_loop()
        self.metrics = Metrics()
        self.pool = UpstreamPool(loop, "http://model.test:8000", "r-primary", settings.limits)
        compiled = CompiledRoute(settings.routes[0], self.pool, [], self.metrics.route("r"),
                                 version=config_version(settings),
                                 capture_cap=settings.recording.max_body_bytes,
                                 max_mirror_body=settings.limits.max_mirror_body_bytes)
        self.sink = Sink()
        self.ctx = ProxyContext(
            loop, Router([("/", None, compiled)]), self.sink,
            max_header_bytes=settings.limits.max_header_bytes,
            client_timeout=settings.limits.client_timeout_s)

    def client(self) -> tuple[ClientConnection, FakeTransport]:
        """A new client connection."""
        conn = ClientConnection(self.ctx)
        transport = FakeTransport()
        conn.connection_made(transport)
        return conn, transport

    def upstream(self) -> tuple[UpstreamConnection, FakeTransport]:
        """A new idle keep-alive connection in the primary's pool (the next one used)."""
        conn = UpstreamConnection(self.pool)
        transport = FakeTransport()
        conn.connection_made(transport)
        self.pool.release(conn)
        return conn, transport

    def idle(self) -> int:
        """Connections in the primary's pool."""
        return len(self.pool._idle)


def response(status: int = 200, body: bytes = b"ok", *headers: bytes) -> bytes:
    """An upstream response with Content-Length."""
    lines = b"".join(h + b"\r\n" for h in headers)
    return b"HTTP/1.1 %d X\r\n%sContent-Length: %d\r\n\r\n%s" % (status, lines, len(body), body)


def split_response(data: bytes) -> tuple[bytes, bytes]:
    """(head, rest) of the first response in ``data``."""
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest
