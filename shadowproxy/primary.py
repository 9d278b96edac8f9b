"""The call to the primary, and ``ClientChannel``: all that call knows of its client.

A ``PrimaryCall`` is the primary side of one client request (``proxy.py`` starts it): it
sends the request (streaming a body too large to mirror), relays the response head and
body to the client, and turns a failure into a JSON 502/504, or into a cut connection once
part of the response has been relayed. The response is captured for the record up to
``recording.max_body_bytes``.

The two sides meet through narrow interfaces, so that each can be read and tested alone:

- the call sees the client as a ``ClientChannel``: a writer that owns the client's response
  framing (chunked or close-delimited bodies, the ``Connection`` header), flow control of
  the client's reading, the keep-alive decision (the connection makes it; a call can only
  lower it, for a body delimited by closing), and a completion callback;
- the connection drives the call through ``send_body``/``end_body`` (a streamed request
  body), ``pause_response``/``resume_response`` (the client reads more slowly than the
  primary answers), ``client_gone`` and ``refuse``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from shadowproxy import http1
from shadowproxy.failures import ErrorKind
from shadowproxy.models import CapturedResponse, Exchange, Headers
from shadowproxy.upstream import UpstreamCall

if TYPE_CHECKING:
    from shadowproxy.proxy import CompiledRoute

# Why reading from the client is paused; it resumes when no reason is left.
READ_PIPELINE: Final = 1
"""Enough requests wait behind the one being served."""
READ_UPSTREAM: Final = 2
"""The primary takes no more of the request body for now."""
READ_CLOSING: Final = 4
"""Nothing more will be read: the connection closes once it has answered."""

CLIENT_GONE: Final = "closed: client disconnected"
"""The recorded error of a call whose client disconnected before its answer ended."""


def _nothing() -> None:
    """The completion callback of a channel whose client is gone."""


class ClientChannel:
    """The client connection as the primary call sees it: one per client connection, set up
    by the connection for each response (``begin``)."""

    __slots__ = ("head_only", "head_sent", "http10", "keep_alive", "on_complete",
                 "pending_head", "read_pauses", "rechunk", "stalled_since", "transport",
                 "writing_paused")

    def __init__(self, on_complete: Callable[[], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.on_complete = on_complete
        """Called once the response is complete (or given up): the connection moves on."""
        self.keep_alive = True
        """The connection's decision: the connection stays open after this response."""
        self.http10 = False
        self.head_only = False
        """The request is a HEAD: an answer of the proxy's own has no body either."""
        self.read_pauses = 0
        """The ``READ_*`` reasons reading from the client is paused for (a bit set)."""
        self.writing_paused = False
        """The client's socket buffer is full: it reads more slowly than we answer."""
        self.stalled_since = 0.0
        self.head_sent = False
        """Part of the response has been written: an error can no longer be answered."""
        self.rechunk = False
        self.pending_head: bytes | None = None

    # --- used by the connection ---
    def begin(self, keep_alive: bool, http10: bool, head_only: bool) -> None:
        """A new response starts; ``keep_alive`` is the connection's decision so far."""
        self.keep_alive = keep_alive
        self.http10 = http10
        self.head_only = head_only
        self.head_sent = False
        self.rechunk = False
        self.pending_head = None

    def started(self) -> bool:
        """The response head has been decided (its Connection header is fixed)."""
        return self.head_sent or self.pending_head is not None

    def gone(self) -> None:
        """The client disconnected: writes go nowhere, completion does nothing."""
        self.transport = None
        self.on_complete = _nothing  # also breaks the connection → channel → connection cycle

    # --- used by the call ---
    def start_response(self, lines: list[bytes], has_length: bool, no_body: bool) -> None:
        """The status line and header lines; the channel adds framing and Connection. The
        head is written with the first piece of body, at the end, or once the read that
        brought it is parsed (``send_head``), whichever comes first."""
        if not no_body and not has_length:
            if self.http10:
                self.keep_alive = False  # an HTTP/1.0 client reads to the end of the connection
            else:
                self.rechunk = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
        if not self.keep_alive:
            lines.append(b"Connection: close\r\n")
        elif self.http10:
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(http1.CRLF)
        self.pending_head = b"".join(lines)

    def send(self, data: bytes) -> None:
        """A piece of the response body."""
        out = http1.chunk(data) if self.rechunk else data
        head = self.pending_head
        if head is not None:
            self.pending_head = None
            self.head_sent = True
            out = head + out
        self.write(out)

    def send_head(self) -> None:
        """Write the head now if it still waits for the first piece of body."""
        head = self.pending_head
        if head is not None:
            self.pending_head = None
            self.head_sent = True
            self.write(head)

    def end_response(self) -> None:
        """The body is complete: write what is left of the response."""
        tail = http1.CHUNKED_END if self.rechunk else b""
        head = self.pending_head
        if head is not None:
            self.pending_head = None
            self.head_sent = True
            tail = head + tail
        if tail:
            self.write(tail)

    def answer(self, status: int, message: str, request_id: str | None) -> None:
        """A whole JSON error response instead of the upstream's (none of it was sent)."""
        self.pending_head = None
        self.write(http1.json_error(status, message, request_id, keep_alive=self.keep_alive,
                                    head_only=self.head_only))

    def cut(self) -> None:
        """End the connection abruptly: the response started and cannot be completed."""
        transport = self.transport
        if transport is not None:
            self.transport = None
            transport.abort()

    def complete(self) -> None:
        """The response is done with (written, answered or cut)."""
        self.on_complete()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(data)

    def pause_reading(self, reason: int) -> None:
        if not self.read_pauses and self.transport is not None:
            self.transport.pause_reading()
        self.read_pauses |= reason

    def resume_reading(self, reason: int) -> None:
        if self.read_pauses & reason:
            self.read_pauses &= ~reason
            if not self.read_pauses and self.transport is not None:
                self.transport.resume_reading()


class PrimaryCall(UpstreamCall):
    """The call to the primary: its response is streamed to the client as it arrives."""

    __slots__ = ("chunked_request", "client", "counters", "refusal")

    def __init__(self, client: ClientChannel, route: CompiledRoute, exchange: Exchange,
                 head: bytes, body: bytes, head_only: bool, may_resend: bool,
                 capture_cap: int) -> None:
        super().__init__(exchange, CapturedResponse("primary", "primary", time.time()), head,
                         body, route.primary_timeout, head_only, may_resend, capture_cap)
        self.client = client
        self.counters = route.counters
        self.chunked_request = False
        self.refusal: tuple[int, str] | None = None
        """The answer the client gets instead of a 502, when its own request was refused."""

    # --- driven by the client connection ---
    def stream_request(self, chunked: bool) -> None:
        """The body follows in pieces; ``chunked`` when its length is not known."""
        self.stream_body()
        self.chunked_request = chunked

    def send_body(self, data: bytes) -> None:
        self.write_body(http1.chunk(data) if self.chunked_request else data)

    def end_body(self) -> None:
        if self.chunked_request:
            self.write_body(http1.CHUNKED_END)
        self.finish_body()

    def pause_response(self) -> None:
        """The client does not take the response as fast as it comes: stop reading it."""
        if self.conn is not None:
            self.conn.pause_reading()

    def resume_response(self) -> None:
        if self.conn is not None:
            self.conn.resume_reading()

    def client_gone(self, reason: str) -> None:
        """The client disconnected (``reason`` as recorded): stop a response that is
        streaming to it, or a request whose body will never end. A call that only waits for
        its answer runs on, so that the primary's answer is recorded."""
        if self.done:
            return
        if self.client.head_sent or self.client.writing_paused or (
                self.streaming and not self.body_done):
            self.cancel(ErrorKind.CLOSED, reason)

    def refuse(self, status: int, message: str) -> None:
        """The client's request turned out to be unacceptable after it was forwarded (in
        its body): end the call; the client gets ``status`` if nothing was sent yet."""
        self.refusal = (status, message)
        self.cancel(ErrorKind.CLOSED, f"closed: the client's request was refused: {message}")

    # --- upstream events ---
    def on_body_paused(self) -> None:
        self.client.pause_reading(READ_UPSTREAM)

    def on_body_resumed(self) -> None:
        self.client.resume_reading(READ_UPSTREAM)

    def on_response_head(self, status: int, reason: bytes, headers: Headers) -> None:
        record = self.record
        record.status = status
        record.headers = headers
        skip = http1.RESPONSE_REWRITTEN
        skip_lengths: frozenset[int] | None = http1.RESPONSE_REWRITTEN_LENGTHS
        has_length = False
        for name, value in headers:
            size = len(name)  # (lower-casing only the names that may match)
            if size == 14:
                if name.lower() == b"content-length":
                    has_length = True
            elif size == 10 and name.lower() == b"connection" and (
                    http1.lists_extra_tokens(value)):
                skip = skip | http1.connection_tokens(headers)
                skip_lengths = None
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason),
                 http1.header_lines(headers, skip, skip_lengths),
                 b"X-Request-Id: ", self.exchange.request_id.encode("ascii"), http1.CRLF]
        self.client.start_response(lines, has_length,
                                   self.head_only or status in http1.NO_BODY_STATUS)

    def on_head_read(self) -> None:
        # The head waits for the first piece of body so that both go in one write; when
        # the body is not in the same read it may be seconds away (a model's first token,
        # the next event of a stream): the client gets the head as it arrived.
        client = self.client
        client.send_head()
        if client.transport is None and http1.header_value(
                self.record.headers or [], b"content-length") is None:
            # The client left while the call waited for its answer (client_gone let it run
            # on, to be recorded), and the answer is a stream, chunked or to the close: it
            # may never end (an event stream), and a model would generate it for nobody.
            # Stopped as a stream the client leaves mid-way is; a body with a length ends.
            self.cancel(ErrorKind.CLOSED, CLIENT_GONE)

    def on_response_body(self, data: bytes) -> None:
        self.capture(data)
        self.client.send(data)

    def on_response_end(self) -> None:
        client = self.client
        client.end_response()
        status = self.record.status
        self._close(status if status is not None else 502)
        client.complete()

    def on_failure(self, kind: ErrorKind, detail: str) -> None:
        record = self.record
        client = self.client
        if client.head_sent:
            # Part of the response is already with the client: the only honest signal left
            # is to cut the connection.
            record.answered_status = record.status
            self._close(record.status or 502)
            client.cut()
            client.complete()
            return
        refusal = self.refusal
        if refusal is not None:
            status, message = refusal
        elif kind is ErrorKind.TIMEOUT:
            status, message = 504, "the primary did not answer in time"
        elif kind is ErrorKind.PROTOCOL:
            status, message = 502, f"the primary's response cannot be relayed: {detail}"
        else:
            status, message = 502, f"the primary could not be reached: {detail}"
        record.answered_status = status
        self._close(status)
        client.answer(status, message, self.exchange.request_id)
        client.complete()

    def _close(self, status: int) -> None:
        latency = self.close_record()
        counters = self.counters
        counters.count(status)
        counters.primary_latency.observe(latency)
