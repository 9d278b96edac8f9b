"""The client side of the data path: parse a request, forward it, stream the answer back.

One ``ClientConnection`` (an asyncio protocol, parsed by httptools) per client socket. For
each request it writes the primary's request first, then fires the shadows (``mirror``),
and the primary's call (``primary.PrimaryCall``) streams the response to the client through
the connection's ``ClientChannel`` as it arrives. Nothing on this path waits for a shadow,
the recorder or the database: the exchange is handed to the recorder by the last upstream
call to finish, with a non-blocking ``submit``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import httptools

from shadowproxy import http1
from shadowproxy.config import Route
from shadowproxy.metrics import RouteCounters
from shadowproxy.mirror import CompiledShadow, start_shadows
from shadowproxy.models import Exchange, Headers, RecordSink
from shadowproxy.primary import (
    CLIENT_GONE,
    READ_CLOSING,
    READ_PIPELINE,
    READ_UPSTREAM,
    ClientChannel,
    PrimaryCall,
)
from shadowproxy.routing import Router, split_url
from shadowproxy.upstream import UpstreamPool

if TYPE_CHECKING:
    from shadowproxy.recorder.rows import RowEncoder

log = logging.getLogger("shadowproxy")

# Requests read ahead of the one being answered (pipelining): reading pauses at 16 of them
# or 1 MiB of their bodies, so a client that sends without reading is held back. What one
# read already holds is still parsed; past 128 requests the connection answers those and
# closes rather than holding more.
_MAX_PIPELINED = 16
_MAX_PIPELINED_BYTES = 1024 * 1024
_MAX_PIPELINED_PARSED = 128
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
# What is left of a request body after its answer (an early 413 or 504) is read and dropped,
# so that the client reads the answer rather than a reset, up to these bounds (aiohttp's
# lingering_time is 10 s); then the connection closes.
_DISCARD_MAX_BYTES = 64 * 1024 * 1024
_DISCARD_S = 10.0


class CompiledRoute:
    """A route compiled for the data path: its pools, shadows and counters.

    A request takes its route when its head is parsed, and with it everything of the
    configuration that it is served under (``version``, the capture and mirror limits, the
    recording ``rules``): a reload swaps the router, never a compiled route, so a request is
    served, mirrored and recorded entirely under the configuration it arrived under.
    """

    __slots__ = ("capture_cap", "counters", "max_mirror_body", "name", "preserve_host",
                 "primary", "primary_timeout", "retry_non_idempotent", "rules", "shadows",
                 "version")

    def __init__(self, route: Route, primary: UpstreamPool, shadows: list[CompiledShadow],
                 counters: RouteCounters, *, version: str, capture_cap: int,
                 max_mirror_body: int, rules: RowEncoder | None = None) -> None:
        self.name = route.name
        self.primary = primary
        self.primary_timeout = route.primary.timeout_s
        self.shadows = shadows
        self.preserve_host = route.preserve_host
        self.retry_non_idempotent = route.retry_non_idempotent
        self.counters = counters
        self.version = version
        self.capture_cap = capture_cap
        """recording.max_body_bytes"""
        self.max_mirror_body = max_mirror_body
        """limits.max_mirror_body_bytes"""
        self.rules = rules
        """The configuration's recording rules (``Recorder.use_rules``), for its exchanges."""

    def pools(self) -> list[UpstreamPool]:
        return [self.primary, *(shadow.pool for shadow in self.shadows)]


class ProxyContext:
    """What every client connection of one process shares.

    ``router`` is replaced whole by a reload (``live.py``), in one synchronous step, and
    ``pools`` with it; the connection-level limits beside it are read per connection event.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, router: Router[CompiledRoute],
                 recorder: RecordSink, *, max_header_bytes: int, client_timeout: float
                 ) -> None:
        self.loop = loop
        self.router = router
        self.recorder = recorder
        self.max_header_bytes = max_header_bytes
        self.client_timeout = client_timeout
        self.connections: set[ClientConnection] = set()
        self.pools: list[UpstreamPool] = []
        for route in router.values():
            self.pools += [pool for pool in route.pools() if pool not in self.pools]
        self.draining = False
        """Set at shutdown: answer in-flight requests, then close instead of keeping alive."""

    def sweep(self) -> None:
        """Close connections idle too long and requests received too slowly (slowloris),
        and upstream connections idle longer than limits.upstream_idle_s."""
        now = self.loop.time()
        deadline = now - self.client_timeout
        for conn in list(self.connections):
            conn.check_timeout(deadline, now)
        for pool in self.pools:
            pool.expire_idle()

    def idle_connections(self) -> list[ClientConnection]:
        return [c for c in self.connections if c.is_idle()]

    def after_reads(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` after the loop has polled for I/O at least once more: what the
        kernel holds for a connection now has reached its ``data_received`` by then. (Two
        turns: asyncio's own loop runs a turn's I/O callbacks after the ones scheduled
        before its poll; uvloop runs them during the poll.)"""
        self.loop.call_soon(self.loop.call_soon, callback)


class ClientRequest:
    """One request as parsed from the client, until its response is complete."""

    __slots__ = (
        "answered",
        "body_size",
        "call",
        "captured",
        "chunks",
        "error",
        "exchange",
        "forwarded_lines",
        "head_done",
        "head_read",
        "header_bytes",
        "headers",
        "http10",
        "keep_alive",
        "method",
        "noted",
        "path",
        "pipelined",
        "query",
        "received_at",
        "route",
        "started",
        "streaming",
        "url",
    )

    def __init__(self, started: float) -> None:
        self.started = started
        self.received_at = time.time()
        self.url = b""
        """The request-target as received (origin-form, or absolute-form)."""
        self.headers: Headers = []
        self.noted: dict[bytes, bytes] = {}
        """The first value of each header in ``http1.NOTED_REQUEST_HEADERS``, by lower name."""
        self.forwarded_lines: list[bytes] = []
        """The pieces of the ``Name: value`` lines passed on to the upstreams (every header
        not in ``http1.REQUEST_REWRITTEN``), gathered while parsing, when each name is
        lower-cased anyway."""
        self.header_bytes = 0
        self.head_done = False
        """The head is parsed: header fields from now on are trailers of a chunked body."""
        self.head_read = 0
        """Bytes of reads that were all head (see ClientConnection.data_received)."""
        self.method = b""
        self.path = b""
        self.query = b""
        self.keep_alive = True
        self.http10 = False
        self.route: CompiledRoute | None = None
        self.chunks: list[bytes] = []
        """The body, held until it is complete (unless it is streamed)."""
        self.body_size = 0
        self.streaming = False
        """The body goes to the primary as it arrives (it is over the mirror limit)."""
        self.captured: list[bytes] | None = None
        """A streamed body's pieces kept for the record; None once the record has it."""
        self.answered = False
        """The response was complete before the request: the rest of the body is dropped."""
        self.pipelined = False
        """Read while another request was being answered: its body counts as buffered."""
        self.exchange: Exchange | None = None
        self.call: PrimaryCall | None = None
        self.error: tuple[int, str] | None = None
        """An answer decided while parsing (status, message): sent instead of forwarding."""


class _Refusal(Exception):
    """Raised in a parser callback: the request is refused with ``status`` (parsing stops)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _StopReading(Exception):
    """Raised in a parser callback: stop reading from this client and close."""


class ClientConnection(asyncio.Protocol):
    """One client socket: requests are served one at a time, in order (pipelining kept)."""

    __slots__ = ("active", "buffered", "channel", "client_addr", "close_after", "ctx",
                 "discard_left", "discard_until", "gone", "gone_reason", "last_active",
                 "parser", "req", "transport", "waiting")

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.channel = ClientChannel(self.response_done)
        self.client_addr: str | None = None
        self.req: ClientRequest | None = None
        """The request being parsed."""
        self.active: ClientRequest | None = None
        """The request being answered (the same as ``req`` while its body streams)."""
        self.waiting: deque[ClientRequest] = deque()
        """Requests read and waiting for their turn."""
        self.buffered = 0
        """Body bytes held for pipelined requests (``ClientRequest.pipelined``)."""
        self.gone = False
        self.gone_reason = CLIENT_GONE
        self.close_after = False
        self.last_active = ctx.loop.time()
        self.discard_left = 0
        self.discard_until = 0.0

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = self.channel.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client_addr = peer[0] if isinstance(peer, tuple) else None
        self.ctx.connections.add(self)
        if self.ctx.draining:
            # Accepted by the kernel before the listener closed and taken by the loop after
            # (the stop's sweep of idle connections has passed): it would stay open past the
            # stop. It closes once the loop has read what it already sent: a request sent
            # before the stop is answered (and the connection closed after it).
            self.ctx.after_reads(self.close_if_idle)

    def data_received(self, data: bytes) -> None:
        req = self.req
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The upgrade request itself was answered 501 (see on_headers_complete); what
            # follows it on this connection is not HTTP: stop reading, close after answering.
            self.close_after = True
            self.channel.pause_reading(READ_CLOSING)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refusal):
                self._reject(cause.status, cause.message)
            elif isinstance(cause, _StopReading):
                self._close()
            else:
                log.exception("internal error while reading a request")
                self._reject(500, "internal error while reading the request")
        except httptools.HttpParserError as exc:
            self._reject(400, f"malformed HTTP request: {exc}")
        else:
            if req is not None and req is self.req and not req.head_done:
                # A read that neither started nor ended a head is all head: counted here
                # too, since the parser holds a header line it has not finished unseen.
                req.head_read += len(data)
                if req.head_read > self.ctx.max_header_bytes:
                    refusal = self._head_too_large()
                    self._reject(refusal.status, refusal.message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.ctx.connections.discard(self)
        # Transport, parser and channel refer back to this protocol: let refcounting free
        # them all.
        self.transport = None
        self.channel.gone()
        self.parser = http1.CLOSED_PARSER  # type: ignore[assignment]
        req = self.req
        if req is not None:
            self._finish_capture(req)  # a streamed request cut short is still recorded
        active = self.active
        if active is not None and active.call is not None:
            active.call.client_gone(self.gone_reason)

    def eof_received(self) -> bool:
        """The client closed its side after sending (``shutdown(SHUT_WR)``, ``nc -N``):
        what it sent in full is answered, then the connection closes; a request it left
        incomplete can never be answered."""
        req = self.req
        if (req is not None and req is self.active) or (self.active is None and not self.waiting):
            return False  # nothing left to answer: the transport closes
        self.req = None  # a request cut short behind those answered is dropped
        self.close_after = True
        channel = self.channel
        if not self.waiting and not channel.started():
            channel.keep_alive = False  # the last answer says the connection closes
        channel.pause_reading(READ_CLOSING)
        return True  # keep the sending side open for the answers

    def pause_writing(self) -> None:
        # The client reads more slowly than it is answered: the primary's response is not
        # read further, and no other request is started until it catches up (or, after
        # limits.client_timeout_s without progress, is disconnected: check_timeout).
        channel = self.channel
        channel.writing_paused = True
        channel.stalled_since = self.ctx.loop.time()
        call = self.active.call if self.active is not None else None
        if call is not None:
            call.pause_response()

    def resume_writing(self) -> None:
        self.channel.writing_paused = False
        active = self.active
        if active is not None:
            if active.call is not None:
                active.call.resume_response()
        elif self.gone or self.transport is None or self.transport.is_closing():
            return
        elif self.waiting:
            self._serve_next()
        else:
            self._next_in_line()

    # --- httptools callbacks ---
    def on_message_begin(self) -> None:
        if len(self.waiting) >= _MAX_PIPELINED_PARSED:
            raise _Refusal(429, "too many pipelined requests")  # the ones read are answered
        self.req = ClientRequest(self.ctx.loop.time())

    def on_url(self, url: bytes) -> None:
        req = self.req
        assert req is not None
        req.url += url
        req.header_bytes += len(url)
        if req.header_bytes > self.ctx.max_header_bytes:
            raise self._head_too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        assert req is not None
        req.header_bytes += len(name) + len(value) + 4
        if req.header_bytes > self.ctx.max_header_bytes:
            raise self._head_too_large()
        if req.head_done:
            # A trailer of a chunked body: dropped, never merged into the head (it would
            # reach the upstreams as a header, and could choose the recorded request id).
            return
        req.headers.append((name, value))
        lname = name.lower()
        if lname not in http1.REQUEST_REWRITTEN:
            lines = req.forwarded_lines
            lines.append(name)
            lines.append(b": ")
            lines.append(value)
            lines.append(http1.CRLF)
        if lname in http1.NOTED_REQUEST_HEADERS:
            noted = req.noted
            if lname not in noted:
                noted[lname] = value
            elif lname in http1.LISTED_REQUEST_HEADERS:
                noted[lname] += b", " + value
            elif lname == b"host":
                raise _Refusal(400, "more than one Host header")

    def _head_too_large(self) -> _Refusal:
        return _Refusal(431, f"request head larger than {self.ctx.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        req.head_done = True
        parser = self.parser
        version = parser.get_http_version()
        req.http10 = version == "1.0"
        if not req.http10 and version != "1.1":
            # HTTP/0.9 has no head to forward (the parser accepts one anyway), and an
            # HTTP/2.0 request line is not HTTP/2: neither is proxied as if it were 1.1.
            raise _Refusal(400, f"HTTP/{version} requests are not accepted: send HTTP/1.1")
        noted = req.noted
        if b"host" not in noted and not req.http10:
            raise _Refusal(400, "an HTTP/1.1 request needs a Host header")
        coding = noted.get(b"transfer-encoding")
        if coding is not None and coding.strip().lower() != b"chunked":
            # The parser reads "gzip, chunked" as chunked and drops the gzip silently.
            raise _Refusal(400, f"Transfer-Encoding {coding.decode('latin-1')!r} is not "
                                "accepted: only chunked")
        req.method = method = parser.get_method()
        # An HTTP/1.0 message with a transfer coding ends the connection (RFC 9112 §6.1).
        req.keep_alive = parser.should_keep_alive() and not (req.http10 and coding is not None)
        req.path, req.query = split_url(req.url)
        if parser.should_upgrade():
            req.error = (501, "protocol upgrades (WebSocket, h2c) are not proxied")
            req.keep_alive = False
            return
        route = req.route = self.ctx.router.match(method, req.path)
        # Behind another request, or behind an answer the client is not reading: held.
        pipelined = req.pipelined = (self.active is not None or bool(self.waiting)
                                     or self.channel.writing_paused)
        if route is not None:
            length = noted.get(b"content-length")
            if not pipelined and length is not None and int(length) > route.max_mirror_body:
                self._start_streaming(req, int(length))
        expect = noted.get(b"expect")
        # A client waiting for 100 Continue sends its body only then, also to a path no
        # route takes (its 404 comes once the body is read). An HTTP/1.0 client is sent no
        # interim response (RFC 9110 §15.2): it ignores the expectation and sends anyway.
        # (White space before the line's end is the parser's, not the value's.)
        if expect is not None and not pipelined and not req.http10 and (
                expect.rstrip(b" \t").lower() == b"100-continue"):
            self.channel.write(http1.CONTINUE_100)

    def on_body(self, body: bytes) -> None:
        req = self.req
        assert req is not None
        route = req.route
        if route is None:
            return  # not routed: the body is read and dropped
        if req.answered:
            self.discard_left -= len(body)
            if self.discard_left < 0:
                raise _StopReading
            return
        req.body_size += len(body)
        if req.streaming:
            self._capture(req, body)
            assert req.call is not None
            req.call.send_body(body)
            return
        req.chunks.append(body)
        if req.pipelined:
            self.buffered += len(body)
            if self.buffered >= _MAX_PIPELINED_BYTES:
                self.channel.pause_reading(READ_PIPELINE)
        if req.body_size > route.max_mirror_body:
            if self.active is not None or self.waiting:
                # Only the request being served can stream; a pipelined one this large is
                # refused rather than buffered without bound.
                raise _Refusal(413, "a pipelined request body over "
                                    "limits.max_mirror_body_bytes cannot be buffered")
            if self.channel.writing_paused:
                # Nothing starts while the client reads none of its last answer: the body
                # waits, and so does reading it (resume_writing).
                if not req.pipelined:
                    req.pipelined = True
                    self.buffered += req.body_size
                self.channel.pause_reading(READ_PIPELINE)
                return
            self._unbuffer(req)
            buffered = b"".join(req.chunks)
            req.chunks = []
            self._start_streaming(req, None)
            self._capture(req, buffered)
            assert req.call is not None
            req.call.send_body(buffered)

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        self.req = None
        if req.answered:
            # The rest of a body whose answer is out: the answer said the connection closes.
            self._close()
            return
        if req.streaming:
            self._finish_capture(req, whole=True)
            assert req.call is not None
            req.call.end_body()
            channel = self.channel
            if not channel.started():
                # The whole request arrived before the answer began: keep-alive is possible.
                channel.keep_alive = self._keep_alive(req)
            return
        if self.active is None and not self.waiting and not self.channel.writing_paused:
            self._serve(req)
        else:
            self.waiting.append(req)
            if not req.pipelined:
                req.pipelined = True
                self.buffered += req.body_size
            if len(self.waiting) >= _MAX_PIPELINED:
                self.channel.pause_reading(READ_PIPELINE)

    # --- serving ---
    def _keep_alive(self, req: ClientRequest) -> bool:
        """Whether the connection stays open after answering ``req`` (so far)."""
        return req.keep_alive and not self.ctx.draining and not (
            self.close_after and not self.waiting)

    def _new_exchange(self, req: ClientRequest, route: CompiledRoute) -> Exchange:
        request_id = req.noted.get(b"x-request-id")
        rid = None
        if request_id is not None:
            # The parser keeps white space before the line's end, which is not part of the
            # value (RFC 9110 §5.5): the client and the upstreams read the id without it.
            request_id = request_id.rstrip(b" \t")
            if 0 < len(request_id) <= 200 and request_id.isascii():
                rid = request_id.decode("ascii")
        exchange = Exchange(route.name, req.received_at, req.method.decode("ascii", "replace"),
                            req.path.decode("latin-1"), req.query.decode("latin-1"),
                            req.headers, self.client_addr, rid)
        exchange.recorder = self.ctx.recorder
        exchange.config_version = route.version
        exchange.rules = route.rules
        exchange.head_bytes = req.header_bytes
        req.exchange = exchange
        return exchange

    def _head_parts(self, req: ClientRequest, exchange: Exchange, content_length: int | None,
                    chunked: bool) -> tuple[bytes, bytes, bytes]:
        """(path and query, common header lines, tail lines) shared by every upstream."""
        headers = req.headers
        noted = req.noted
        connection = noted.get(b"connection")
        if connection is not None and http1.lists_extra_tokens(connection):
            common = http1.header_lines(
                headers, http1.REQUEST_REWRITTEN | http1.connection_tokens(headers))
        else:
            common = b"".join(req.forwarded_lines)
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
        path_query = req.path + b"?" + req.query if req.query else req.path
        return path_query, common, b"".join(tail)

    def _primary_head(self, req: ClientRequest, route: CompiledRoute, path_query: bytes,
                      common: bytes, tail: bytes) -> bytes:
        host = req.noted.get(b"host") if route.preserve_host else None
        pool = route.primary
        return http1.request_head(
            req.method, pool.base_path + path_query,
            b"Host: " + (host or pool.host_header) + b"\r\n" + common + tail)

    def _unbuffer(self, req: ClientRequest) -> None:
        """``req`` leaves the pipeline: its body no longer counts as buffered."""
        if req.pipelined:
            req.pipelined = False
            self.buffered -= req.body_size

    def _serve_next(self) -> None:
        """Serve the first waiting request; read on once the pipeline has room again."""
        nxt = self.waiting.popleft()
        self._unbuffer(nxt)
        channel = self.channel
        if channel.read_pauses & READ_PIPELINE and len(self.waiting) < _MAX_PIPELINED // 2 \
                and self.buffered < _MAX_PIPELINED_BYTES // 2:
            channel.resume_reading(READ_PIPELINE)
            if self.req is not None:
                self.req.started = self.ctx.loop.time()  # it was held back, not slow
        self._serve(nxt)

    def _serve(self, req: ClientRequest) -> None:
        self.active = req
        self._unbuffer(req)
        self.channel.begin(self._keep_alive(req), req.http10, req.method == b"HEAD")
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
        cap = route.capture_cap
        exchange.body = body if len(body) <= cap else body[:cap]
        exchange.body_size = len(body)
        exchange.body_truncated = len(body) > cap
        length = len(body) if body or req.method in _BODY_METHODS else None
        # A body held past the mirror limit (while the client read nothing) is not mirrored.
        skip = "body_too_large" if len(body) > route.max_mirror_body else None
        self._forward(req, route, exchange, body, length, streaming=False, skip_reason=skip)

    def _start_streaming(self, req: ClientRequest, length: int | None) -> None:
        """Send a body too large to mirror straight to the primary; shadows are skipped."""
        route = req.route
        assert route is not None
        self.active = req
        req.streaming = True
        req.captured = []
        # Connection: close, unless the whole request arrives before the answer begins.
        self.channel.begin(False, req.http10, req.method == b"HEAD")
        exchange = self._new_exchange(req, route)
        exchange.hold()  # the record waits for the body (_finish_capture)
        self._forward(req, route, exchange, b"", length, streaming=True,
                      skip_reason="body_too_large")

    def _capture(self, req: ClientRequest, data: bytes) -> None:
        captured = req.captured
        route = req.route
        if captured is not None and req.exchange is not None and route is not None:
            req.exchange.capture(captured, data, route.capture_cap)

    def _finish_capture(self, req: ClientRequest, *, whole: bool = False) -> None:
        """A streamed body ended (``whole``) or was given up (an early answer, a refusal,
        the client gone): the record gets what was kept of it."""
        captured = req.captured
        exchange = req.exchange
        if captured is None or exchange is None:
            return
        req.captured = None
        exchange.body = captured[0] if len(captured) == 1 else b"".join(captured)
        if not whole:
            # Not the body the client meant to send, however much of it is kept: flagged,
            # so that neither a reader nor a replay takes it for the whole request.
            exchange.body_truncated = True
        exchange.finish_call()

    def _forward(self, req: ClientRequest, route: CompiledRoute, exchange: Exchange,
                 body: bytes, length: int | None, streaming: bool,
                 skip_reason: str | None) -> None:
        """Start the primary's call, then the shadows' (unless ``skip_reason``). A body
        being streamed goes with Content-Length when known, else chunked."""
        chunked = streaming and length is None
        path_query, common, tail = self._head_parts(req, exchange, length, chunked=chunked)
        head = self._primary_head(req, route, path_query, common, tail)
        method = req.method
        # Sent again on a stale keep-alive connection only when a repeat is harmless.
        may_resend = method in http1.IDEMPOTENT_METHODS or route.retry_non_idempotent
        channel = self.channel
        # (begin has noted whether the request is a HEAD: its answer has no body)
        call = req.call = PrimaryCall(channel, route, exchange, head, body,
                                      channel.head_only, may_resend, route.capture_cap)
        if streaming:
            call.stream_request(chunked=chunked)
        route.primary.start(call)
        if route.shadows:
            start_shadows(route.shadows, exchange, method, path_query, req.headers, common,
                          tail, body, skip_reason, may_resend, route.capture_cap,
                          req.noted.get(b"connection"))

    def response_done(self) -> None:
        """The completion callback: the active request's response is complete (or given
        up). Serve the next request, drop the rest of an answered body, or close."""
        req = self.active
        if req is None:
            return
        self.active = None
        req.call = None  # call and request refer to each other: let plain refcounting free them
        self.last_active = now = self.ctx.loop.time()
        transport = self.transport
        if self.gone or transport is None or transport.is_closing():
            # Cut (the primary's answer broke off) or closing: a request read behind this
            # one is never forwarded, since no answer to it could reach the client.
            return
        channel = self.channel
        channel.resume_reading(READ_UPSTREAM)
        if self.req is req:
            # Answered before the whole request arrived (an early 413, a 504): the record
            # keeps what was forwarded, the rest is read and dropped up to a bound and a
            # deadline, then the connection closes (the answer said so).
            req.answered = True
            self._finish_capture(req)
            self.discard_left = _DISCARD_MAX_BYTES
            self.discard_until = now + _DISCARD_S
            return
        if not channel.keep_alive or self.ctx.draining or (self.close_after and not self.waiting):
            self._close()
            return
        if channel.writing_paused:
            return  # resume_writing moves on
        if self.waiting:
            self._serve_next()
        else:
            self._next_in_line()

    def _next_in_line(self) -> None:
        """Nothing waits: a request still being read is next, no longer held back."""
        channel = self.channel
        nxt = self.req
        if nxt is not None:
            self._unbuffer(nxt)
            if channel.read_pauses & READ_PIPELINE:
                nxt.started = self.ctx.loop.time()
        channel.resume_reading(READ_PIPELINE)

    def _respond_error(self, req: ClientRequest, status: int, message: str) -> None:
        route = req.route
        if route is not None:
            route.counters.count(status)
        rid = req.exchange.request_id if req.exchange is not None else None
        self.channel.answer(status, message, rid)
        self.response_done()

    def _reject(self, status: int, message: str) -> None:
        """A request that cannot be parsed or accepted: answer it and close the connection."""
        req = self.req
        self.req = None
        if self.transport is None or self.gone:
            return
        channel = self.channel
        channel.pause_reading(READ_CLOSING)
        if req is not None and req.answered:
            self._close()  # its answer is out already
            return
        active = self.active
        head_only = req is not None and req.method == b"HEAD"
        if active is None and not self.waiting:
            channel.begin(False, False, head_only)
            channel.answer(status, message, None)
            self._close()
            return
        self.close_after = True  # answer what was accepted first, then close
        if req is not None and active is req:
            # The request being streamed to the primary can never be completed.
            self._finish_capture(req)
            if req.call is not None:
                req.call.refuse(status, message)
            return
        # Behind requests still to be answered: its refusal waits for its turn, the last
        # answer on this connection.
        refused = ClientRequest(self.ctx.loop.time())
        refused.error = (status, message)
        refused.keep_alive = False
        if head_only:
            refused.method = b"HEAD"
        self.waiting.append(refused)

    def _close(self) -> None:
        """Close once what was written has been sent."""
        if self.transport is not None:
            self.transport.close()

    # --- housekeeping ---
    def is_idle(self) -> bool:
        return self.active is None and self.req is None and not self.waiting

    def check_timeout(self, deadline: float, now: float) -> None:
        if self.gone or self.transport is None:
            return
        channel = self.channel
        if channel.writing_paused and channel.stalled_since < deadline:
            # The client has taken nothing for limits.client_timeout_s: let it go, and
            # with it everything held for it.
            self.gone_reason = "closed: the client stopped reading (limits.client_timeout_s)"
            self.transport.abort()
            return
        req = self.req
        if req is not None and req.answered:
            if now > self.discard_until:
                self._close()
        elif req is not None and self.active is None and req.started < deadline:
            self._reject(408, "request not received in time (limits.client_timeout_s)")
        elif self.is_idle() and self.last_active < deadline:
            self.transport.close()

    def close_if_idle(self) -> None:
        if self.is_idle() and self.transport is not None:
            self.transport.close()
