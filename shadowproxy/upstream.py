"""Upstream connections: one keep-alive pool per upstream, raw protocols, httptools parsing.

Socket and HTTP-parser errors on the upstream side are handled here: they become a failure
of the call (an ``ErrorKind`` and a detail such as ``connect: Connection refused``), never an
exception. A call (``UpstreamCall``) is a small state object; subclasses in
``proxy.py`` (the primary, streamed back to the client) and ``mirror.py`` (shadows,
captured for the record) react to its events.

Why raw protocols instead of ``aiohttp.ClientSession``: a shadow proxy makes two or more
upstream calls per request, and the client session's per-request machinery (tasks,
timeouts, stream readers, header multidicts) costs several times the CPU budget of a whole
mirrored request. Here a call is one write and parser callbacks.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from urllib.parse import urlsplit

import httptools

from shadowproxy import http1
from shadowproxy.failures import ErrorKind
from shadowproxy.models import Headers
from shadowproxy.tasks import spawn

_NO_BODY_STATUS = frozenset({204, 304})

MAX_IDLE_PER_UPSTREAM = 512
_WRITE_JOIN_LIMIT = 65_536


class UpstreamCall:
    """One request to one upstream. Subclasses override the ``on_*`` events.

    Exactly one of ``on_response_end`` or ``on_failure`` is called, once.
    """

    __slots__ = ("_progress", "body", "conn", "done", "expect_no_body", "head", "pool",
                 "retried", "sent_at", "timeout", "timer")

    def __init__(self, head: bytes, body: bytes, timeout: float, expect_no_body: bool) -> None:
        self.head = head
        self.body = body
        self.timeout = timeout
        self.expect_no_body = expect_no_body
        """True for HEAD requests: the response has headers only, whatever they say."""
        self.conn: UpstreamConnection | None = None
        self.pool: UpstreamPool | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.sent_at = 0.0
        self.done = False
        self.retried = False
        self._progress = 0

    # --- events, overridden by subclasses ---
    def on_response_head(self, status: int, reason: bytes, headers: Headers,
                         conn: UpstreamConnection) -> None:
        """The status line and headers arrived."""

    def on_response_body(self, data: bytes) -> None:
        """A piece of the (de-chunked) body arrived."""

    def on_response_end(self) -> None:
        """The response is complete."""

    def on_failure(self, kind: ErrorKind, detail: str) -> None:
        """No complete response: ``kind`` says why, ``detail`` in words."""

    def take_body(self) -> bytes:
        """The request body to send with the head once a connection is attached."""
        return self.body

    def on_upstream_pause(self) -> None:
        """The upstream reads our request more slowly than we write it."""

    def on_upstream_resume(self) -> None:
        """The upstream caught up with our writes."""

    # --- driven by the pool and the connection ---
    def _finish(self) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None  # the handle refers back to this call
        if self.pool is not None:
            self.pool.active.discard(self)

    def fail(self, kind: ErrorKind, detail: str) -> None:
        if not self.done:
            self._finish()
            self.on_failure(kind, detail)

    def end(self) -> None:
        if not self.done:
            self._finish()
            self.on_response_end()

    def _timed_out(self) -> None:
        if self.done:
            return
        conn = self.conn
        if conn is not None and conn.head_received and conn.progress != self._progress:
            # A streaming body that still flows is not timed out: re-arm for another period.
            self._progress = conn.progress
            assert self.pool is not None
            self.timer = self.pool.loop.call_later(self.timeout, self._timed_out)
            return
        if conn is not None:
            conn.call = None
            conn.abort()
        self.fail(ErrorKind.TIMEOUT, "timeout")


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to an upstream, carrying one call at a time."""

    __slots__ = ("body_until_close", "call", "closed", "head_received", "headers",
                 "keep_alive", "parser", "pool", "progress", "reason", "received",
                 "reused", "transport")

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.call: UpstreamCall | None = None
        self.headers: Headers = []
        self.reason = b""
        self.keep_alive = True
        self.closed = False
        self.received = False
        self.head_received = False
        self.body_until_close = False
        self.reused = False
        self.progress = 0

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.call is None:
            # Bytes nobody asked for (or after a timeout): the connection is unusable.
            self.abort()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            call = self.call
            self.call = None
            self.abort()
            if call is not None:
                call.fail(ErrorKind.PROTOCOL, f"malformed response: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        # Parser and transport refer back to this protocol: drop them, so that a closed
        # connection is freed at once rather than by a cyclic GC pass (timeouts against a
        # hung shadow close hundreds of connections a second).
        self.parser = http1.CLOSED_PARSER  # type: ignore[assignment]
        self.transport = None
        call = self.call
        if call is None:
            return
        self.call = None
        if self.body_until_close and exc is None:
            call.end()  # a response delimited by the end of the connection
        elif self.reused and not self.received and not call.retried:
            # The upstream closed an idle keep-alive connection just as we reused it: the
            # request was not processed, so sending it once more on a new connection is safe.
            call.retried = True
            self.pool.connect(call)
        elif isinstance(exc, ConnectionResetError | BrokenPipeError):
            call.fail(ErrorKind.RESET, f"reset: {exc}")
        elif exc is not None:
            call.fail(ErrorKind.CLOSED, f"closed: {exc}")
        else:
            call.fail(ErrorKind.CLOSED,
                      "closed: upstream closed the connection before the response ended")

    def pause_writing(self) -> None:
        if self.call is not None:
            self.call.on_upstream_pause()

    def resume_writing(self) -> None:
        if self.call is not None:
            self.call.on_upstream_resume()

    # --- httptools callbacks ---
    def on_status(self, reason: bytes) -> None:
        self.reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        call = self.call
        if status < 200 or call is None:
            self.headers = []  # 1xx interim response: wait for the final one
            return
        self.keep_alive = parser.should_keep_alive()
        self.head_received = True
        headers = self.headers
        if call.expect_no_body or status in _NO_BODY_STATUS:
            call.on_response_head(status, self.reason, headers, self)
            # The parser cannot be told that a HEAD response has no body; start a fresh one.
            self.parser = httptools.HttpResponseParser(self)
            self._complete()
            return
        framed = False
        for name, _ in headers:
            lname = name.lower()
            if lname == b"content-length" or lname == b"transfer-encoding":
                framed = True
                break
        self.body_until_close = not framed
        if not framed:
            self.keep_alive = False
        call.on_response_head(status, self.reason, headers, self)

    def on_body(self, body: bytes) -> None:
        call = self.call
        if call is not None:
            self.progress += 1
            call.on_response_body(body)

    def on_message_complete(self) -> None:
        if self.head_received:
            self._complete()

    # --- used by the pool and the calls ---
    def send(self, call: UpstreamCall, reused: bool) -> None:
        self.call = call
        call.conn = self
        self.reused = reused
        self.received = False
        self.head_received = False
        self.body_until_close = False
        self.headers = []
        transport = self.transport
        assert transport is not None
        body = call.take_body()
        if not body:
            transport.write(call.head)
        elif len(body) <= _WRITE_JOIN_LIMIT:
            transport.write(call.head + body)
        else:
            transport.writelines((call.head, body))

    def _complete(self) -> None:
        call = self.call
        self.call = None
        if self.keep_alive and not self.closed:
            self.pool.release(self)
        else:
            self.abort()
        if call is not None:
            call.end()

    def abort(self) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            self.closed = True
            transport.abort()
        self.pool.forget(self)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()


class UpstreamPool:
    """Keep-alive connections to one upstream, reused LIFO; new ones made on demand."""

    def __init__(self, loop: asyncio.AbstractEventLoop, url: str, name: str) -> None:
        parts = urlsplit(url)
        self.loop = loop
        self.name = name
        self.host = parts.hostname or "127.0.0.1"
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None)
        self.port = parts.port or (443 if self.ssl else 80)
        default_port = 443 if self.ssl else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if self.port == default_port
                            else f"{host}:{self.port}").encode("idna")
        self.base_path = parts.path.rstrip("/").encode()
        """A path prefix from the upstream's URL, put before the request's path."""
        self._idle: list[UpstreamConnection] = []
        self.active: set[UpstreamCall] = set()
        """Calls in flight, so that shutdown can end the ones that outlive the grace period."""
        self._connecting = 0
        self._closing = False
        self.retired = False
        """No longer in the running configuration (``retire``)."""

    def start(self, call: UpstreamCall) -> None:
        """Send ``call`` on an idle connection, or on a new one; never blocks."""
        call.pool = self
        self.active.add(call)
        loop = self.loop
        # Not loop.time(): uvloop's clock moves in whole milliseconds, too coarse for latency.
        call.sent_at = time.perf_counter()
        call.timer = loop.call_later(call.timeout, call._timed_out)
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.send(call, reused=True)
                return
        self.connect(call)

    def connect(self, call: UpstreamCall) -> None:
        """Send ``call`` on a new connection (made in the background)."""
        if self._closing:
            call.fail(ErrorKind.SHUTDOWN, "shutdown: the proxy is stopping")
            return
        spawn(self._connect_and_send(call), name=f"connect-{self.name}")

    async def _connect_and_send(self, call: UpstreamCall) -> None:
        self._connecting += 1
        try:
            _, conn = await self.loop.create_connection(
                lambda: UpstreamConnection(self), self.host, self.port, ssl=self.ssl)
        except (OSError, ssl.SSLError, asyncio.CancelledError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            call.fail(ErrorKind.CONNECT, f"connect: {reason}")
            return
        finally:
            self._connecting -= 1
        if call.done:  # timed out while connecting
            conn.abort()
            return
        conn.send(call, reused=False)

    def release(self, conn: UpstreamConnection) -> None:
        if self._closing or self.retired or len(self._idle) >= MAX_IDLE_PER_UPSTREAM:
            conn.abort()
        else:
            self._idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        idle = self._idle
        if idle and conn in idle:
            idle.remove(conn)

    def retire(self) -> None:
        """The running configuration no longer names this upstream: close the idle
        connections now and each busy one when its call ends. Calls of requests that
        arrived under an earlier configuration are still made (``revive`` undoes it)."""
        self.retired = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abort()

    def revive(self) -> None:
        """A reloaded configuration names this upstream again."""
        self.retired = False

    def close(self) -> None:
        """Close idle connections; calls in flight finish on their own connections."""
        self._closing = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abort()

    def abort_active(self) -> None:
        """End every call still in flight (the shutdown grace is over)."""
        for call in list(self.active):
            conn = call.conn
            if conn is not None:
                conn.call = None
                conn.abort()
            call.fail(ErrorKind.SHUTDOWN,
                      "shutdown: the call outlived limits.shutdown_grace_s")
