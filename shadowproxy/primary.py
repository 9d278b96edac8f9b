"""The call to the primary: its response is streamed to the client as it arrives.

A ``PrimaryCall`` is the primary side of one client request (``proxy.py``): it sends the
request (streaming a body too large to mirror), relays the response head and body to the
client with its own framing, and turns a failure into a JSON 502/504, or into a cut
connection once part of the response has been relayed. The response is captured for the
record up to ``recording.max_body_bytes``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from shadowproxy import http1
from shadowproxy.failures import ErrorKind
from shadowproxy.models import CapturedResponse, Exchange, Headers
from shadowproxy.upstream import UpstreamCall, UpstreamConnection

if TYPE_CHECKING:
    from shadowproxy.proxy import ClientConnection, ClientRequest, RouteTarget


def capture_request_body(exchange: Exchange, data: bytes, cap: int) -> None:
    room = cap - len(exchange.body)
    exchange.body_size += len(data)
    if room >= len(data):
        exchange.body += data
    else:
        if room > 0:
            exchange.body += data[:room]
        exchange.body_truncated = True


class PrimaryCall(UpstreamCall):
    """The call to the primary: its response is streamed to the client as it arrives."""

    __slots__ = ("chunks", "client", "exchange", "head_sent", "pending_head", "pending_out",
                 "rechunk", "record", "req", "route", "stream_chunked", "streaming_body")

    def __init__(self, client: ClientConnection, req: ClientRequest, route: RouteTarget,
                 exchange: Exchange, head: bytes, body: bytes) -> None:
        super().__init__(head, body, route.primary_timeout, req.method == b"HEAD")
        self.client = client
        self.req = req
        self.route = route
        self.exchange = exchange
        self.record = CapturedResponse("primary", "primary", time.time())
        exchange.start_call(self.record)
        self.chunks: list[bytes] = []
        self.pending_head: bytes | None = None
        self.head_sent = False
        self.rechunk = False
        self.streaming_body = False
        self.stream_chunked = False
        self.pending_out: list[bytes] = []

    # --- request body streaming (bodies over limits.max_mirror_body_bytes) ---
    def stream_request(self, chunked: bool) -> None:
        self.streaming_body = True
        self.stream_chunked = chunked
        self.retried = True  # a half-sent body cannot be sent again

    def send_body(self, data: bytes) -> None:
        if self.done:
            return
        out = http1.chunk(data) if self.stream_chunked else data
        conn = self.conn
        if conn is None:
            self.pending_out.append(out)
        elif conn.transport is not None and not conn.closed:
            conn.transport.write(out)

    def take_body(self) -> bytes:
        if not self.streaming_body:
            return self.body
        out, self.pending_out = b"".join(self.pending_out), []
        return out

    def on_upstream_pause(self) -> None:
        transport = self.client.transport
        if self.streaming_body and transport is not None and not self.client.gone:
            transport.pause_reading()

    def on_upstream_resume(self) -> None:
        transport = self.client.transport
        if self.streaming_body and transport is not None and not self.client.gone:
            transport.resume_reading()

    def end_body(self) -> None:
        if self.stream_chunked:
            self.send_body(b"")  # the zero-length chunk ends a chunked body

    # --- response events ---
    def on_response_head(self, status: int, reason: bytes, headers: Headers,
                         conn: UpstreamConnection) -> None:
        record = self.record
        record.status = status
        record.headers = headers
        req = self.req
        skip = http1.RESPONSE_REWRITTEN
        has_length = False
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-length":
                has_length = True
            elif lname == b"connection" and http1.lists_extra_tokens(value):
                skip = skip | http1.connection_tokens(headers)
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason), http1.header_lines(headers, skip),
                 b"X-Request-Id: ", self.exchange.request_id.encode("ascii"), b"\r\n"]
        no_body = self.expect_no_body or status in (204, 304)
        if not no_body and not has_length:
            if req.http10:
                req.keep_alive = False  # an HTTP/1.0 client reads to the end of the connection
            else:
                self.rechunk = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
        if not req.keep_alive or self.client.ctx.draining:
            lines.append(b"Connection: close\r\n")
        elif req.http10:
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        self.pending_head = b"".join(lines)

    def on_response_body(self, data: bytes) -> None:
        self.record.capture(self.chunks, data, self.route.capture_cap)
        out = http1.chunk(data) if self.rechunk else data
        head = self.pending_head
        if head is not None:
            self.pending_head = None
            self.head_sent = True
            out = head + out
        self.client._write(out)

    def on_response_end(self) -> None:
        tail = http1.CHUNKED_END if self.rechunk else b""
        head = self.pending_head
        if head is not None:
            self.pending_head = None
            self.head_sent = True
            tail = head + tail
        if tail:
            self.client._write(tail)
        status = self.record.status
        self._close(status if status is not None else 502)
        self.client.response_done(self.req)

    def on_failure(self, kind: ErrorKind, detail: str) -> None:
        record = self.record
        record.error_kind = kind
        record.error = detail
        self.pending_head = None
        if self.head_sent:
            # Part of the response is already with the client: the only honest signal left
            # is to cut the connection.
            self._close(self.record.status or 502)
            transport = self.client.transport
            if transport is not None and not self.client.gone:
                transport.abort()
            self.client.response_done(self.req)
            return
        status = 504 if kind is ErrorKind.TIMEOUT else 502
        self._close(status)
        message = ("the primary did not answer in time" if status == 504
                   else f"the primary could not be reached: {detail}")
        client = self.client
        keep_alive = self.req.keep_alive and not client.ctx.draining
        client._write(http1.json_error(status, message, self.exchange.request_id,
                                       keep_alive=keep_alive))
        client.response_done(self.req)

    def _close(self, status: int) -> None:
        record = self.record
        assert self.pool is not None
        record.latency_ms = latency = (time.perf_counter() - self.sent_at) * 1000.0
        record.body = b"".join(self.chunks) if self.chunks else b""
        counters = self.route.counters
        counters.count(status)
        counters.primary_latency.observe(latency)
        self.exchange.finish_call()

    def client_gone(self) -> None:
        """The client disconnected: stop a response that is still streaming to it."""
        if self.head_sent and not self.done:
            conn = self.conn
            self.conn = None
            if conn is not None:
                conn.call = None
                conn.abort()
            self.fail(ErrorKind.CLOSED, "closed: client disconnected")
