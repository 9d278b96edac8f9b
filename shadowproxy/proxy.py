"""The client side of the data path: parse a request, forward it, stream the answer back.

One ``ClientConnection`` (an asyncio protocol, parsed by httptools) per client socket. For
each request it writes the primary's request first, then fires the shadows (``mirror``),
and streams the primary's response to the client as it arrives. Nothing on this path waits
for a shadow, the recorder or the database: the exchange is handed to the recorder by the
last upstream call to finish, with a non-blocking ``submit``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import httptools

from shadowproxy import http1
from shadowproxy.metrics import RouteCounters
from shadowproxy.mirror import ShadowTarget, start_shadows
from shadowproxy.models import Exchange, Headers, RecordSink
from shadowproxy.primary import PrimaryCall, capture_request_body
from shadowproxy.routing import Router, split_target
from shadowproxy.upstream import UpstreamPool

log = logging.getLogger("shadowproxy")

_MAX_PIPELINED = 16
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


class RouteTarget:
    """A route compiled for the data path: its pools, shadows and counters.

    A request takes its route when its head is parsed, and with it everything of the
    configuration that it is served under (``version``, the capture and mirror limits): a
    reload swaps the router, never a compiled route, so a request is served, mirrored and
    recorded entirely under the configuration it arrived under.
    """

    __slots__ = ("capture_cap", "counters", "max_mirror_body", "name", "preserve_host",
                 "primary", "primary_timeout", "shadows", "version")

    def __init__(self, name: str, primary: UpstreamPool, primary_timeout: float,
                 shadows: list[ShadowTarget], preserve_host: bool,
                 counters: RouteCounters, *, version: str, capture_cap: int,
                 max_mirror_body: int) -> None:
        self.name = name
        self.primary = primary
        self.primary_timeout = primary_timeout
        self.shadows = shadows
        self.preserve_host = preserve_host
        self.counters = counters
        self.version = version
        self.capture_cap = capture_cap
        """recording.max_body_bytes"""
        self.max_mirror_body = max_mirror_body
        """limits.max_mirror_body_bytes"""


class ProxyContext:
    """What every client connection of one process shares.

    ``router`` is replaced whole by a reload (``live.py``), in one synchronous step; the
    connection-level limits beside it are read per connection event.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, router: Router[RouteTarget],
                 recorder: RecordSink, *, max_header_bytes: int, client_timeout: float
                 ) -> None:
        self.loop = loop
        self.router = router
        self.recorder = recorder
        self.max_header_bytes = max_header_bytes
        self.client_timeout = client_timeout
        self.connections: set[ClientConnection] = set()
        self.draining = False
        """Set at shutdown: answer in-flight requests, then close instead of keeping alive."""

    def sweep(self) -> None:
        """Close connections idle too long and requests received too slowly (slowloris)."""
        deadline = self.loop.time() - self.client_timeout
        for conn in list(self.connections):
            conn.check_timeout(deadline)

    def idle_connections(self) -> list[ClientConnection]:
        return [c for c in self.connections if c.is_idle()]


class ClientRequest:
    """One request as parsed from the client, until its response is complete."""

    __slots__ = (
        "body_size",
        "call",
        "chunks",
        "complete",
        "error",
        "exchange",
        "header_bytes",
        "headers",
        "http10",
        "keep_alive",
        "method",
        "noted",
        "path",
        "query",
        "received_at",
        "route",
        "started",
        "streaming",
        "target",
    )

    def __init__(self, started: float) -> None:
        self.started = started
        self.received_at = time.time()
        self.target = b""
        self.headers: Headers = []
        self.noted: dict[bytes, bytes] = {}
        """The first value of each header in ``http1.NOTED_REQUEST_HEADERS``, by lower name."""
        self.header_bytes = 0
        self.method = b""
        self.path = b""
        self.query = b""
        self.keep_alive = True
        self.http10 = False
        self.route: RouteTarget | None = None
        self.chunks: list[bytes] = []
        self.body_size = 0
        self.complete = False
        self.streaming = False
        self.exchange: Exchange | None = None
        self.call: PrimaryCall | None = None
        self.error: tuple[int, str] | None = None
        """An answer decided while parsing (status, message): sent instead of forwarding."""


class _HeaderTooLarge(Exception):
    pass


class ClientConnection(asyncio.Protocol):
    """One client socket: requests are served one at a time, in order (pipelining kept)."""

    __slots__ = ("active", "client_addr", "close_after", "ctx", "gone", "last_active",
                 "parser", "paused", "req", "transport", "waiting")

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client_addr: str | None = None
        self.req: ClientRequest | None = None
        self.active: ClientRequest | None = None
        self.waiting: deque[ClientRequest] = deque()
        self.gone = False
        self.paused = False
        self.close_after = False
        self.last_active = ctx.loop.time()

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client_addr = peer[0] if isinstance(peer, tuple) else None
        self.ctx.connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The upgrade request itself was answered 501 (see on_headers_complete); what
            # follows it on this connection is not HTTP: stop reading, close after answering.
            self.close_after = True
            if self.transport is not None:
                self.transport.pause_reading()
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeaderTooLarge):
                self._reject(431, f"request head larger than {self.ctx.max_header_bytes} bytes")
            else:
                log.exception("internal error while reading a request")
                self._reject(500, "internal error while reading the request")
        except httptools.HttpParserError as exc:
            self._reject(400, f"malformed HTTP request: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.ctx.connections.discard(self)
        # Transport and parser refer back to this protocol: let refcounting free them all.
        self.transport = None
        self.parser = http1.CLOSED_PARSER  # type: ignore[assignment]
        active = self.active
        if active is not None and active.call is not None:
            active.call.client_gone()

    def pause_writing(self) -> None:
        call = self.active.call if self.active is not None else None
        if call is not None and call.conn is not None:
            call.conn.pause_reading()

    def resume_writing(self) -> None:
        call = self.active.call if self.active is not None else None
        if call is not None and call.conn is not None:
            call.conn.resume_reading()

    # --- httptools callbacks ---
    def on_message_begin(self) -> None:
        self.req = ClientRequest(self.ctx.loop.time())

    def on_url(self, url: bytes) -> None:
        req = self.req
        assert req is not None
        req.target += url
        req.header_bytes += len(url)
        if req.header_bytes > self.ctx.max_header_bytes:
            raise _HeaderTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        assert req is not None
        req.headers.append((name, value))
        lname = name.lower()
        if lname in http1.NOTED_REQUEST_HEADERS:
            noted = req.noted
            if lname not in noted:
                noted[lname] = value
            elif lname == b"connection":  # repeated Connection headers list tokens together
                noted[lname] += b", " + value
        req.header_bytes += len(name) + len(value) + 4
        if req.header_bytes > self.ctx.max_header_bytes:
            raise _HeaderTooLarge

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        parser = self.parser
        req.method = method = parser.get_method()
        req.keep_alive = parser.should_keep_alive()
        req.http10 = parser.get_http_version() == "1.0"
        req.path, req.query = split_target(req.target)
        if parser.should_upgrade():
            req.error = (501, "protocol upgrades (WebSocket, h2c) are not proxied")
            req.keep_alive = False
            return
        route = req.route = self.ctx.router.match(method, req.path)
        if route is None:
            return
        length = req.noted.get(b"content-length")
        pipelined = self.active is not None
        if not pipelined and length is not None and int(length) > route.max_mirror_body:
            self._start_streaming(req, int(length))
        expect = req.noted.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and not pipelined:
            self._write(http1.CONTINUE_100)

    def on_body(self, body: bytes) -> None:
        req = self.req
        assert req is not None
        route = req.route
        if route is None:
            return  # not routed: the body is read and dropped
        req.body_size += len(body)
        if req.streaming:
            assert req.call is not None and req.exchange is not None
            req.call.send_body(body)
            capture_request_body(req.exchange, body, route.capture_cap)
            return
        req.chunks.append(body)
        if req.body_size > route.max_mirror_body:
            if self.active is not None:
                # Only the request being served can stream; a pipelined one this large is
                # refused rather than buffered without bound.
                self._reject(413, "a pipelined request body over "
                                  "limits.max_mirror_body_bytes cannot be buffered")
                return
            buffered = b"".join(req.chunks)
            req.chunks = []
            self._start_streaming(req, None)
            assert req.call is not None and req.exchange is not None
            req.call.send_body(buffered)
            capture_request_body(req.exchange, buffered, route.capture_cap)

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        self.req = None
        req.complete = True
        if req.streaming:
            assert req.call is not None
            req.call.end_body()
            return
        if self.active is None:
            self._serve(req)
        else:
            self.waiting.append(req)
            if len(self.waiting) >= _MAX_PIPELINED and self.transport is not None:
                self.transport.pause_reading()
                self.paused = True

    # --- serving ---
    def _new_exchange(self, req: ClientRequest, route: RouteTarget) -> Exchange:
        request_id = req.noted.get(b"x-request-id")
        rid = None
        if request_id is not None and 0 < len(request_id) <= 200 and request_id.isascii():
            rid = request_id.decode("ascii")
        exchange = Exchange(route.name, req.received_at, req.method.decode("ascii", "replace"),
                            req.path.decode("latin-1"), req.query.decode("latin-1"),
                            req.headers, self.client_addr, rid)
        exchange.recorder = self.ctx.recorder
        exchange.config_version = route.version
        req.exchange = exchange
        return exchange

    def _head_parts(self, req: ClientRequest, exchange: Exchange, content_length: int | None,
                    chunked: bool) -> tuple[bytes, bytes, bytes]:
        """(request target, common header lines, tail lines) shared by every upstream."""
        headers = req.headers
        noted = req.noted
        skip = http1.REQUEST_REWRITTEN
        connection = noted.get(b"connection")
        if connection is not None and http1.lists_extra_tokens(connection):
            skip = skip | http1.connection_tokens(headers)
        common = http1.header_lines(headers, skip)
        client = (self.client_addr or "unknown").encode()
        forwarded = noted.get(b"x-forwarded-for")
        host = noted.get(b"host")
        tail = [b"X-Forwarded-For: ", forwarded + b", " + client if forwarded else client,
                b"\r\nX-Forwarded-Proto: http\r\n"]
        if host is not None:
            tail += [b"X-Forwarded-Host: ", host, b"\r\n"]
        tail += [b"X-Request-Id: ", exchange.request_id.encode("ascii"), b"\r\n"]
        if chunked:
            tail.append(b"Transfer-Encoding: chunked\r\n")
        elif content_length is not None:
            tail.append(b"Content-Length: %d\r\n" % content_length)
        target = req.path + b"?" + req.query if req.query else req.path
        return target, common, b"".join(tail)

    def _primary_head(self, req: ClientRequest, route: RouteTarget, target: bytes,
                      common: bytes, tail: bytes) -> bytes:
        host = req.noted.get(b"host") if route.preserve_host else None
        pool = route.primary
        return http1.request_head(
            req.method, pool.base_path + target,
            b"Host: " + (host or pool.host_header) + b"\r\n" + common + tail)

    def _serve(self, req: ClientRequest) -> None:
        self.active = req
        if req.error is not None:
            self._respond_error(req, *req.error)
            return
        route = req.route
        if route is None:
            self._respond_error(req, 404, f"no route matches {req.method.decode()} "
                                          f"{req.path.decode('latin-1')}")
            return
        exchange = self._new_exchange(req, route)
        body = b"".join(req.chunks) if len(req.chunks) != 1 else req.chunks[0]
        req.chunks = []
        capture_request_body(exchange, body, route.capture_cap)
        length = len(body) if body or req.method in _BODY_METHODS else None
        self._forward(req, route, exchange, body, length, skip_reason=None)

    def _start_streaming(self, req: ClientRequest, length: int | None) -> None:
        """Send a body too large to mirror straight to the primary; shadows are skipped."""
        route = req.route
        assert route is not None
        self.active = req
        req.streaming = True
        exchange = self._new_exchange(req, route)
        self._forward(req, route, exchange, b"", length, skip_reason="body_too_large")

    def _forward(self, req: ClientRequest, route: RouteTarget, exchange: Exchange,
                 body: bytes, length: int | None, skip_reason: str | None) -> None:
        """Start the primary's call, then the shadows'. A body being streamed (skip_reason
        set) goes with Content-Length when known, else chunked, and to the primary only."""
        streaming = skip_reason is not None
        chunked = streaming and length is None
        target, common, tail = self._head_parts(req, exchange, length, chunked=chunked)
        head = self._primary_head(req, route, target, common, tail)
        call = req.call = PrimaryCall(self, req, route, exchange, head, body)
        if streaming:
            call.stream_request(chunked=chunked)
        route.primary.start(call)
        if route.shadows:
            start_shadows(route.shadows, exchange, req.method, target, req.headers, common,
                          tail, body, skip_reason, route.capture_cap)

    def response_done(self, req: ClientRequest) -> None:
        """The response to ``req`` is fully written: serve the next request, or close."""
        self.active = None
        req.call = None  # call and request refer to each other: let plain refcounting free them
        self.last_active = self.ctx.loop.time()
        if self.gone:
            return
        if not req.keep_alive or self.close_after or self.ctx.draining:
            assert self.transport is not None
            self.transport.close()
            return
        if self.waiting:
            nxt = self.waiting.popleft()
            if self.paused and len(self.waiting) < _MAX_PIPELINED // 2:
                assert self.transport is not None
                self.transport.resume_reading()
                self.paused = False
            self._serve(nxt)

    def _respond_error(self, req: ClientRequest, status: int, message: str) -> None:
        route = req.route
        if route is not None:
            route.counters.count(status)
        keep_alive = req.keep_alive and not self.ctx.draining
        rid = req.exchange.request_id if req.exchange is not None else None
        self._write(http1.json_error(status, message, rid, keep_alive=keep_alive))
        self.response_done(req)

    def _reject(self, status: int, message: str) -> None:
        """A request that cannot be parsed or accepted: answer it and close the connection."""
        self.req = None
        if self.transport is None or self.gone:
            return
        self.transport.pause_reading()
        if self.active is None:
            self._write(http1.json_error(status, message, None, keep_alive=False))
            self.transport.close()
        else:
            self.close_after = True  # answer what was accepted first, then close

    def _write(self, data: bytes) -> None:
        if not self.gone and self.transport is not None:
            self.transport.write(data)

    # --- housekeeping ---
    def is_idle(self) -> bool:
        return self.active is None and self.req is None and not self.waiting

    def check_timeout(self, deadline: float) -> None:
        if self.gone or self.transport is None:
            return
        req = self.req
        if req is not None and self.active is None and req.started < deadline:
            self._reject(408, "request not received in time (limits.client_timeout_s)")
        elif self.is_idle() and self.last_active < deadline:
            self.transport.close()

    def close_if_idle(self) -> None:
        if self.is_idle() and self.transport is not None:
            self.transport.close()
