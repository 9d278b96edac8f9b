"""Upstream connections: one keep-alive pool per upstream, raw protocols, httptools parsing.

Socket and HTTP-parser errors on the upstream side are handled here: they become a failure
of the call (an ``ErrorKind`` and a detail such as ``connect: Connection refused``), never an
exception. A call (``UpstreamCall``) is a small state object; subclasses in
``primary.py`` (the primary, streamed back to the client) and ``mirror.py`` (shadows,
captured for the record) react to its events.

Why raw protocols instead of ``aiohttp.ClientSession``: a shadow proxy makes two or more
upstream calls per request, and the client session's per-request machinery (tasks,
timeouts, stream readers, header multidicts) costs several times the CPU budget of a whole
mirrored request. Here a call is one write and parser callbacks.
"""

from __future__ import annotations

import asyncio
import math
import ssl
import time
from typing import Final
from urllib.parse import urlsplit

import httptools

from shadowproxy import http1
from shadowproxy.config import Limits
from shadowproxy.failures import ErrorKind
from shadowproxy.models import CapturedResponse, Exchange, Headers, StreamArrivals
from shadowproxy.tasks import spawn

MAX_IDLE_PER_UPSTREAM = 512
_WRITE_JOIN_LIMIT = 65_536
TIMEOUT_SLACK_S = 0.01
"""Timeouts fire at most this late when many fall due one after another."""


# Where a connection is in the exchange of its current call.
_IDLE: Final = 0
"""No call: any byte received is unsolicited and closes the connection."""
_AWAITING: Final = 1
"""The request is (being) sent; no final response head yet (1xx interim heads are skipped)."""
_BODY: Final = 2
"""The final head arrived; its body is being read."""
_DONE: Final = 3
"""The response ended during the current ``data_received``; settled when it returns."""


class UpstreamCall:
    """One request to one upstream, and its outcome on the exchange's record.

    Subclasses (``primary.PrimaryCall``, ``mirror.ShadowCall``, ``replay.call.ReplayCall``)
    react to the ``on_*`` events; exactly one of ``on_response_end`` or ``on_failure`` is
    called, once, and a failure is on the record (``error_kind``, ``error``) by then. A request
    body too large to hold is streamed: ``stream_body``, then ``write_body`` as pieces
    arrive and ``finish_body``.
    """

    __slots__ = ("_progress", "body", "body_done", "cancel_reason", "capture_cap", "chunks",
                 "conn", "connecting", "deadline", "done", "exchange", "head", "head_only",
                 "max_duration", "may_resend", "pending", "pool", "record", "sent_at",
                 "streaming", "timeout")

    def __init__(self, exchange: Exchange, record: CapturedResponse, head: bytes, body: bytes,
                 timeout: float, head_only: bool, may_resend: bool, capture_cap: int) -> None:
        self.exchange = exchange
        self.record = record
        exchange.start_call(record)
        self.head = head
        self.body = body
        self.timeout = timeout
        self.max_duration = math.inf
        """The whole call's bound, a body still flowing included (a shadow's
        ``max_duration_s``); the primary's stream is bounded by its client instead."""
        self.head_only = head_only
        """True for HEAD requests: the response has headers only, whatever they say."""
        self.capture_cap = capture_cap
        self.chunks: list[bytes] = []
        """The response body captured for the record, up to ``capture_cap`` bytes."""
        self.streaming = False
        self.body_done = False
        """A streamed body has been written to its end."""
        self.pending: list[bytes] | None = None
        """Pieces of a streamed body that arrived before the connection was made."""
        self.conn: UpstreamConnection | None = None
        self.connecting: asyncio.Task[None] | None = None
        """The attempt to make this call's connection, while it runs."""
        self.cancel_reason: tuple[ErrorKind, str] | None = None
        self.pool: UpstreamPool | None = None
        self.sent_at = 0.0
        self.deadline = 0.0
        """When the call times out (``time.perf_counter``); the pool's timer enforces it."""
        self.done = False
        self.may_resend = may_resend
        """The request may be sent once more if a reused keep-alive connection turns out
        to be closed before any byte of the response: idempotent methods, or a route that
        opted in (``retry_non_idempotent``); never a streamed body; at most once."""
        self._progress = 0

    # --- events, overridden by subclasses ---
    def on_response_head(self, status: int, reason: bytes, headers: Headers) -> None:
        """The status line and headers arrived: onto the record."""
        record = self.record
        record.status = status
        record.headers = headers

    def on_response_body(self, data: bytes) -> None:
        """A piece of the (de-chunked) body arrived: captured for the record."""
        self.capture(data)

    def on_head_read(self) -> None:
        """The read that brought the final response head is parsed, and the response goes
        on in later reads (called once per response, and only then)."""

    def on_response_end(self) -> None:
        """The response is complete."""

    def on_failure(self, kind: ErrorKind, detail: str) -> None:
        """No complete response: ``kind`` says why, ``detail`` in words."""

    def on_body_paused(self) -> None:
        """The upstream takes no more of a streamed body for now (no connection yet, or it
        reads more slowly than we write)."""

    def on_body_resumed(self) -> None:
        """The upstream takes the streamed body again."""

    # --- the request body ---
    def stream_body(self) -> None:
        """The body is not all here: it follows the head in pieces (``write_body``)."""
        self.streaming = True
        self.may_resend = False  # a body sent as it arrives cannot be sent again

    def write_body(self, data: bytes) -> None:
        """Send the next piece of a streamed body (framed as it goes on the wire)."""
        if self.done:
            return
        conn = self.conn
        if conn is not None:
            conn.write(data)
            return
        pending = self.pending
        if pending is None:
            self.pending = pending = []
        pending.append(data)
        if len(pending) == 1:
            self.on_body_paused()  # until the connection is made and takes it

    def finish_body(self) -> None:
        """The streamed body has been written to its end."""
        self.body_done = True
        conn = self.conn
        if conn is not None:
            conn.request_sent = True

    def take_body(self) -> bytes:
        """The body to send with the head, now that a connection is attached."""
        if not self.streaming:
            return self.body
        pending = self.pending
        if not pending:
            return b""
        self.pending = None
        self.on_body_resumed()
        return pending[0] if len(pending) == 1 else b"".join(pending)

    # --- the record ---
    def capture(self, data: bytes) -> None:
        """Count a piece of the response body, keeping it for the record up to the cap; an
        event stream's piece also gets its time of arrival."""
        record = self.record
        stream = record.stream
        if stream is not None:
            stream.arrived(record.body_size, self.capture_cap)
        record.capture(self.chunks, data, self.capture_cap)

    def note_head(self, headers: Headers) -> None:
        """The final head of a response with a body arrived: an event stream
        (``text/event-stream``) is timed piece by piece, for ``responses.stream``."""
        for name, value in headers:
            if len(name) == 12 and name.lower() == b"content-type":
                if value.lstrip()[:17].lower() == b"text/event-stream":
                    self.record.stream = StreamArrivals(self.sent_at, time.perf_counter())
                return

    def close_record(self) -> float:
        """Latency and body onto the record, and tell the exchange this call ended.

        Returns the latency in milliseconds."""
        record = self.record
        record.latency_ms = latency = (time.perf_counter() - self.sent_at) * 1000.0
        chunks = self.chunks
        record.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.exchange.finish_call()
        return latency

    # --- driven by the pool and the connection ---
    def _finish(self) -> None:
        self.done = True
        if self.pool is not None:
            self.pool.active.discard(self)

    def fail(self, kind: ErrorKind, detail: str) -> None:
        if not self.done:
            self._finish()
            record = self.record
            record.error_kind = kind
            record.error = detail
            self.on_failure(kind, detail)

    def end(self) -> None:
        if not self.done:
            self._finish()
            self.on_response_end()

    def cancel(self, kind: ErrorKind, detail: str) -> None:
        """End the call now, whatever it waits for: its connection is closed.

        A connection still being made is cancelled, which closes its socket, and the call
        fails once that is done: until then it is in flight (``max_in_flight``), so that a
        host that drops connection attempts cannot pile up half-open sockets."""
        if self.done:
            return
        connecting = self.connecting
        if connecting is not None:
            if self.cancel_reason is None:
                self.cancel_reason = (kind, detail)
                connecting.cancel()
            return
        conn = self.conn
        if conn is not None:
            conn.detach()
        self.fail(kind, detail)

    def _timed_out(self) -> None:
        if self.done:
            return
        now = time.perf_counter()
        end = self.sent_at + self.max_duration
        conn = self.conn
        if conn is not None and conn.state == _BODY and now < end and (
                conn.reading_paused or conn.progress != self._progress):
            # A streaming body that still flows is not timed out, nor one held back because
            # the client reads slowly (the client side bounds that): re-arm, up to the
            # call's whole bound.
            self._progress = conn.progress
            self.deadline = min(now + self.timeout, end)  # the pool's next scan sees it
            return
        self.cancel(ErrorKind.TIMEOUT, "timeout" if now < end else
                    f"timeout: still answering after max_duration_s ({self.max_duration:g} s)")


class _HeadTooLarge(Exception):
    """Raised in a parser callback: the response head is over the pool's cap."""


class _UnsupportedCoding(Exception):
    """Raised in a parser callback: the response's body has a transfer coding besides
    chunked (``gzip, chunked``). The parser reads the chunks and would hand on the coded
    bytes as the body, with nothing left to say they are coded."""


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to an upstream, carrying one call at a time.

    A response ends inside the parser's callbacks, but the connection is settled only once
    the bytes of that read have all been parsed: anything after the end of the response
    (a second, unsolicited response; a body after a 204 or to a HEAD) marks the connection
    ``dirty`` and it is closed instead of going back to the pool. A connection returns to
    the pool exactly once per response, in ``_settle``.
    """

    __slots__ = ("body_until_close", "call", "closed", "dirty", "head_bytes", "head_only",
                 "head_read", "headers", "idle_since", "keep_alive", "parser", "pool",
                 "pooled", "progress", "reading_paused", "reason", "received", "request_sent",
                 "reused", "state", "transport")

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.call: UpstreamCall | None = None
        self.state = _IDLE
        self.headers: Headers = []
        self.head_bytes = 0
        """Bytes of status lines and header fields in the current response (capped)."""
        self.head_read = 0
        """Bytes of reads that were all head (capped: see data_received)."""
        self.reason = b""
        self.keep_alive = True
        self.closed = False
        self.received = False
        self.dirty = False
        """Bytes arrived that belong to no request: the connection must not be reused."""
        self.head_only = False
        """The current request is a HEAD: its response has no body, whatever it says."""
        self.body_until_close = False
        self.request_sent = False
        """The whole request has been written: only then may the connection be reused."""
        self.reading_paused = False
        """Reading stopped because the client does not take the response as fast."""
        self.reused = False
        self.pooled = False
        """In the pool's idle list."""
        self.idle_since = 0.0
        """When it went back to the pool (``time.perf_counter``)."""
        self.progress = 0

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.state == _IDLE:
            # Bytes nobody asked for (or after the call was cut): the connection is unusable.
            self.abort()
            return
        self.received = True
        awaiting = self.state == _AWAITING
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self.state != _DONE:
                self._fail(ErrorKind.PROTOCOL, "upstream answered 101 Switching Protocols: "
                                               "protocol upgrades are not proxied")
                return
            self.dirty = True
        except httptools.HttpParserError as exc:
            if self.state == _DONE:
                self.dirty = True  # garbage after a complete response: closed when settled
            elif isinstance(exc.__context__, _HeadTooLarge):
                self._head_too_large()
                return
            elif isinstance(exc.__context__, _UnsupportedCoding):
                self._fail(ErrorKind.PROTOCOL, str(exc.__context__))
                return
            else:
                self._fail(ErrorKind.PROTOCOL, f"malformed response: {exc}")
                return
        state = self.state
        if state == _DONE:
            self._settle()
        elif awaiting and state == _BODY:
            call = self.call
            if call is not None:
                call.on_head_read()  # the body follows in later reads
        elif awaiting and state == _AWAITING:
            # A read in which no final head ended was all head (or interim responses):
            # counted too, since the parser holds an unfinished header line unreported.
            self.head_read += len(data)
            if self.head_read > self.pool.max_head_bytes:
                self._head_too_large()

    def _head_too_large(self) -> None:
        self._fail(ErrorKind.PROTOCOL, f"response head larger than {self.pool.max_head_bytes} "
                                       "bytes (limits.max_response_header_bytes)")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        # Parser and transport refer back to this protocol: drop them, so that a closed
        # connection is freed at once rather than by a cyclic GC pass (timeouts against a
        # hung shadow close hundreds of connections a second).
        self.parser = http1.CLOSED_PARSER  # type: ignore[assignment]
        self.transport = None
        call = self.call
        state = self.state
        self.state = _IDLE
        if call is None:
            return
        self.call = None
        call.conn = None
        if self.body_until_close and state == _BODY and exc is None:
            call.end()  # a response delimited by the end of the connection
        elif self.reused and not self.received and call.may_resend:
            # The upstream closed an idle keep-alive connection just as we reused it. The
            # request was most likely not processed, but that cannot be known: it is sent
            # once more only when a repeat is harmless (see UpstreamCall.may_resend).
            call.may_resend = False
            self.pool.connect(call)
        elif isinstance(exc, ConnectionResetError | BrokenPipeError):
            call.fail(ErrorKind.RESET, f"reset: {exc}")
        elif exc is not None:
            call.fail(ErrorKind.CLOSED, f"closed: {exc}")
        else:
            call.fail(ErrorKind.CLOSED,
                      "closed: upstream closed the connection before the response ended")

    def pause_writing(self) -> None:
        call = self.call
        if call is not None and call.streaming:
            call.on_body_paused()

    def resume_writing(self) -> None:
        call = self.call
        if call is not None and call.streaming:
            call.on_body_resumed()

    # --- httptools callbacks ---
    def on_message_begin(self) -> None:
        if self.state != _AWAITING:
            self.dirty = True  # a second message after the response: nobody asked for it
        self.reason = b""
        self.head_bytes += 17  # "HTTP/1.1 200 " and CRLF, roughly

    def on_status(self, reason: bytes) -> None:
        self.reason += reason  # the parser hands it over in pieces when a read splits it
        self.head_bytes += len(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.pool.max_head_bytes:
            raise _HeadTooLarge
        if self.state == _AWAITING:
            self.headers.append((name, value))
        # Otherwise a trailer of a chunked body, or part of a message nobody asked for:
        # never merged into the head (it was relayed and recorded already).

    def on_headers_complete(self) -> None:
        if self.state != _AWAITING:
            return
        parser = self.parser
        status = parser.get_status_code()
        call = self.call
        assert call is not None
        if status < 200:
            self.headers = []  # 1xx interim response: wait for the final one
            return
        # A response that starts before the whole request was written (an early 413, say)
        # leaves the connection in an unknown state: it is never reused.
        self.keep_alive = parser.should_keep_alive() and self.request_sent
        headers = self.headers
        call.record.head_bytes = self.head_bytes
        if self.head_only:
            # The parser cannot be told that a HEAD response has no body: the response ends
            # here, and a fresh parser takes the next one (see _settle). Nor can it tell
            # keep-alive: it takes an answer without Content-Length or Transfer-Encoding to
            # run to the close, so whether the connection stays open is read from the
            # version and Connection here (a HEAD answer has no body, RFC 9112 §6.3).
            if not self.keep_alive and self.request_sent:
                self.keep_alive = http1.keeps_alive(parser.get_http_version(), headers)
            self.state = _DONE
            call.on_response_head(status, self.reason, headers)
            return
        self.state = _BODY
        # The head is progress too: the body gets a whole timeout_s for its first piece,
        # however late in the call's first timeout_s the head came (see _timed_out).
        self.progress += 1
        if status not in http1.NO_BODY_STATUS:  # the parser itself ends 204 and 304 here
            framed = False
            codings = 0
            for name, value in headers:
                size = len(name)  # (lower-casing only the names that may match)
                if size == 14 and name.lower() == b"content-length":
                    framed = True  # with a Transfer-Encoding too, the parser refuses it
                    break
                if size == 17 and name.lower() == b"transfer-encoding":
                    # Every line counts: "chunked" then "gzip" on a second line is
                    # "chunked, gzip", and the parser would read to the close.
                    codings += 1
                    if codings > 1 or value.strip().lower() != b"chunked":
                        raise _UnsupportedCoding(
                            f"response with Transfer-Encoding {value.decode('latin-1')!r}"
                            f"{' on a second line' if codings > 1 else ''}: only chunked "
                            "is relayed")
                    framed = True
            if not framed:
                self.body_until_close = True
                self.keep_alive = False
            call.note_head(headers)
        call.on_response_head(status, self.reason, headers)

    def on_body(self, body: bytes) -> None:
        if self.state != _BODY:
            self.dirty = True  # a body after a HEAD response: nobody asked for it
            return
        call = self.call
        if call is not None:
            self.progress += 1
            call.on_response_body(body)

    def on_message_complete(self) -> None:
        if self.state == _BODY:
            self.state = _DONE
        # Otherwise the end of a 1xx interim response (still _AWAITING), or of a HEAD
        # response already ended at its head (_DONE).

    # --- used by the pool and the calls ---
    def send(self, call: UpstreamCall, reused: bool) -> None:
        self.call = call
        call.conn = self
        self.state = _AWAITING
        self.head_only = call.head_only
        self.request_sent = not call.streaming or call.body_done
        self.reused = reused
        self.received = False
        self.dirty = False
        self.body_until_close = False
        self.headers = []
        self.head_bytes = self.head_read = 0
        transport = self.transport
        assert transport is not None
        body = call.take_body()
        if not body:
            transport.write(call.head)
        elif len(body) <= _WRITE_JOIN_LIMIT:
            transport.write(call.head + body)
        else:
            transport.writelines((call.head, body))

    def write(self, data: bytes) -> None:
        """More of the current request (a streamed body)."""
        transport = self.transport
        if transport is not None and not self.closed:
            transport.write(data)

    def _settle(self) -> None:
        """The response is complete and this read fully parsed: pool or close, then end."""
        call = self.call
        self.call = None
        self.state = _IDLE
        if self.keep_alive and self.request_sent and not self.dirty and not self.closed:
            if self.head_only:
                # The old parser may be waiting for the body the headers announced.
                self.parser = httptools.HttpResponseParser(self)
            if self.reading_paused:
                self.resume_reading()
            self.pool.release(self)
        else:
            self.abort()
        if call is not None:
            call.conn = None
            call.end()

    def _fail(self, kind: ErrorKind, detail: str) -> None:
        call = self.call
        self.detach()
        if call is not None:
            call.fail(kind, detail)

    def detach(self) -> None:
        """Let go of the current call (it failed, timed out, or its client left), and close:
        what the upstream still sends for it must never reach another call."""
        call = self.call
        if call is not None:
            self.call = None
            call.conn = None
        self.state = _IDLE
        self.abort()

    def abort(self) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            self.closed = True
            transport.abort()
        self.pool.forget(self)

    def pause_reading(self) -> None:
        self.reading_paused = True
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.reading_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()


def _discard(made: list[UpstreamConnection]) -> None:
    """Free the protocol of a connection attempt that failed or was cut. uvloop makes the
    protocol before the socket connects and, when the attempt fails, never calls its
    ``connection_lost``: its parser still refers back to it, a cycle only the cyclic
    collector would free (against a dead upstream, a thousand a second)."""
    for conn in made:
        if not conn.closed:
            conn.closed = True
            conn.parser = http1.CLOSED_PARSER  # type: ignore[assignment]
            conn.transport = None
    made.clear()


class UpstreamPool:
    """Keep-alive connections to one upstream, reused LIFO; new ones made on demand."""

    def __init__(self, loop: asyncio.AbstractEventLoop, url: str, name: str,
                 limits: Limits) -> None:
        parts = urlsplit(url)
        self.loop = loop
        self.name = name
        self.max_head_bytes = limits.max_response_header_bytes
        """Status line and headers of a response (trailers included) are capped here: an
        upstream that sends header lines without end is a protocol failure, not memory."""
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
        self.idle_s = limits.upstream_idle_s
        """Idle connections older than this are closed, not reused: servers close theirs
        after a keep-alive timeout of their own, and a request sent on a connection the
        server is closing fails."""
        self._idle: list[UpstreamConnection] = []
        self.active: set[UpstreamCall] = set()
        """Calls in flight: their timeouts, and shutdown ends the ones that outlive the grace
        period."""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        """One timer for the timeouts of every call in flight, armed for the earliest
        deadline, instead of one armed and then cancelled by (almost) every call: that pair
        cost about a twentieth of the proxy's instructions per mirrored request
        (``bench/breakdown.py --callgrind``)."""
        self._closing = False
        self._task_name = f"connect-{name}"
        self.retired = False
        """No longer in the running configuration (``retire``)."""

    def start(self, call: UpstreamCall) -> None:
        """Send ``call`` on an idle connection, or on a new one; never blocks."""
        call.pool = self
        self.active.add(call)
        # Not loop.time(): uvloop's clock moves in whole milliseconds, too coarse for latency.
        call.sent_at = now = time.perf_counter()
        deadline = call.deadline = now + call.timeout
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline, now)
        idle = self._idle
        if idle:
            conn = idle.pop()
            conn.pooled = False
            if call.sent_at - conn.idle_since < self.idle_s:
                conn.send(call, reused=True)
                return
            # The most recently used connection idled too long: so did all the others.
            conn.abort()
            self._idle = []
            for old in idle:
                old.pooled = False
                old.abort()
        self.connect(call)

    def _arm(self, deadline: float, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_later(max(deadline - now, 0.0), self._expire)

    def _expire(self) -> None:
        """Time out the calls that are due, then sleep until the next deadline; at least
        ``TIMEOUT_SLACK_S`` later, so that a stream of timeouts (a hung shadow) costs one
        scan of the calls in flight per slack, not one per call."""
        self._timer = None
        now = time.perf_counter()
        active = self.active
        due = [call for call in active if call.deadline <= now]
        for call in due:
            call._timed_out()  # ends the call, or gives a body still flowing a new deadline
        later = [call.deadline for call in active if call.deadline > now]
        if later:
            self._arm(max(min(later), now + TIMEOUT_SLACK_S), now)

    def connect(self, call: UpstreamCall) -> None:
        """Send ``call`` on a new connection (made in the background)."""
        if self._closing:
            call.fail(ErrorKind.SHUTDOWN, "shutdown: the proxy is stopping")
            return
        call.connecting = spawn(self._connect_and_send(call), name=self._task_name)

    async def _connect_and_send(self, call: UpstreamCall) -> None:
        made: list[UpstreamConnection] = []

        def new_connection() -> UpstreamConnection:
            conn = UpstreamConnection(self)
            made.append(conn)
            return conn

        try:
            _, conn = await self.loop.create_connection(
                new_connection, self.host, self.port, ssl=self.ssl)
        except asyncio.CancelledError:
            # The socket is closed by now (create_connection closes it when cancelled).
            _discard(made)
            call.connecting = None
            reason = call.cancel_reason
            if reason is None:  # cancelled from outside: the event loop is closing
                call.fail(ErrorKind.SHUTDOWN, "shutdown: the proxy is stopping")
                raise
            call.fail(reason[0], reason[1])
            return
        except (OSError, ssl.SSLError) as exc:
            _discard(made)
            call.connecting = None
            reason_text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            call.fail(ErrorKind.CONNECT, f"connect: {reason_text}")
            return
        call.connecting = None
        if call.done:
            conn.abort()
            return
        conn.send(call, reused=False)

    def release(self, conn: UpstreamConnection) -> None:
        if self._closing or self.retired or len(self._idle) >= MAX_IDLE_PER_UPSTREAM:
            conn.abort()
        else:
            conn.idle_since = time.perf_counter()
            conn.pooled = True
            self._idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        if conn.pooled:
            conn.pooled = False
            self._idle.remove(conn)

    def expire_idle(self) -> None:
        """Close idle connections older than ``idle_s`` (the oldest are first in line)."""
        idle = self._idle
        deadline = time.perf_counter() - self.idle_s
        n = 0
        while n < len(idle) and idle[n].idle_since < deadline:
            n += 1
        if n:
            expired, self._idle = idle[:n], idle[n:]
            for conn in expired:
                conn.pooled = False
                conn.abort()

    def retire(self) -> None:
        """The running configuration no longer names this upstream: close the idle
        connections now and each busy one when its call ends. Calls of requests that
        arrived under an earlier configuration are still made (``revive`` undoes it)."""
        self.retired = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.pooled = False
            conn.abort()

    def use_limits(self, limits: Limits) -> None:
        """A reload's limits: what a connection may send as a response head, and how long
        an idle one is kept (the next sweep or call applies it to those idle now)."""
        self.max_head_bytes = limits.max_response_header_bytes
        self.idle_s = limits.upstream_idle_s

    def revive(self) -> None:
        """A reloaded configuration names this upstream again."""
        self.retired = False

    def close(self) -> None:
        """Close idle connections; calls in flight finish on their own connections."""
        self._closing = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.pooled = False
            conn.abort()

    def abort_active(self) -> None:
        """End every call still in flight (the shutdown grace is over)."""
        for call in list(self.active):
            call.cancel(ErrorKind.SHUTDOWN, "shutdown: the call outlived limits.shutdown_grace_s")
