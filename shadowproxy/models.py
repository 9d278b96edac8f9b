"""The exchange record: one client request and every upstream call made for it.

These objects are filled on the data path and handed to the recorder when the last call
finishes. They hold raw bytes only: decoding, redaction and JSON detection happen in the
recorder, off the client's path. ``__slots__`` keeps them small and fast to build.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import TYPE_CHECKING, Protocol

from asyncpg.pgproto.pgproto import UUID as _FastUUID  # asyncpg's C UUID, a uuid.UUID

if TYPE_CHECKING:
    from shadowproxy.recorder.rows import RowEncoder

Headers = list[tuple[bytes, bytes]]

_IDS_PER_READ = 512


class _TimeOrderedIds:
    """UUIDs of version 7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits.

    Time-ordered keys make every insert into the primary-key and request-id indexes land
    at their right edge, instead of on a random page of an index larger than the cache: the
    database's work per record is what bounds the recorder's throughput. The random bits
    come 512 ids at a time from one ``os.urandom`` call (``uuid.uuid4()`` makes a system
    call and a pure-Python object per request), and asyncpg's UUID type is built from the
    16 bytes in C and COPYs without conversion.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0
        # A forked worker must not hand out the random bits its parent has buffered.
        os.register_at_fork(after_in_child=self.discard)

    def discard(self) -> None:
        self._buf = b""
        self._pos = 0

    def next(self) -> uuid.UUID:
        pos = self._pos
        if pos >= len(self._buf):
            buf = bytearray(os.urandom(10 * _IDS_PER_READ))
            for i in range(0, len(buf), 10):
                buf[i] = (buf[i] & 0x0F) | 0x70  # version 7
                buf[i + 2] = (buf[i + 2] & 0x3F) | 0x80  # the RFC 9562 variant
            self._buf = bytes(buf)
            pos = 0
        self._pos = pos + 10
        millis = time.time_ns() // 1_000_000
        new_id: uuid.UUID = _FastUUID(millis.to_bytes(6, "big") + self._buf[pos:pos + 10])
        return new_id


record_ids = _TimeOrderedIds()


def keep_piece(chunks: list[bytes], data: bytes, room: int) -> bool:
    """Append ``data`` to ``chunks``, cut to ``room`` bytes; True when some of it was cut."""
    if room >= len(data):
        chunks.append(data)
        return False
    if room > 0:
        chunks.append(data[:room])
    return True


class RecordSink(Protocol):
    """Where finished exchanges go (the recorder)."""

    def submit(self, exchange: Exchange) -> None: ...


class StreamArrivals:
    """When the pieces of a streamed (``text/event-stream``) response body arrived: all the
    data path records per piece; ``streams.assemble`` reads it in the recorder."""

    __slots__ = ("arrivals", "head_at", "sent_at")

    def __init__(self, sent_at: float, head_at: float) -> None:
        self.sent_at = sent_at
        """``time.perf_counter()`` when the request was sent."""
        self.head_at = head_at
        """``time.perf_counter()`` when the response head arrived."""
        self.arrivals: list[tuple[int, float]] = []
        """Per piece: (body bytes received before it, ``time.perf_counter()``)."""

    def arrived(self, offset: int, cap: int) -> None:
        """A piece arrived after ``offset`` bytes of body. Past the recording cap ``cap``
        only the last piece's arrival is kept (the end of the stream): no bytes are kept
        there to time tokens by, and a long stream must not grow the list without bound."""
        now = time.perf_counter()
        arrivals = self.arrivals
        if offset > cap and arrivals and arrivals[-1][0] >= cap:
            arrivals[-1] = (offset, now)
        else:
            arrivals.append((offset, now))


class CapturedResponse:
    """The outcome of one upstream call: a response, or an error stored as data."""

    __slots__ = (
        "answered_status",
        "body",
        "body_size",
        "body_truncated",
        "error",
        "error_kind",
        "head_bytes",
        "headers",
        "latency_ms",
        "role",
        "started_at",
        "status",
        "stream",
        "target",
    )

    def __init__(self, target: str, role: str, started_at: float) -> None:
        self.target = target
        """The name the answer is stored under (``responses.target``, the metric label):
        'primary', a shadow's name, or a replay's ``--as`` name."""
        self.role = role
        """'primary', 'shadow' or 'replay'."""
        self.started_at = started_at
        """Wall-clock time (epoch seconds) the call started."""
        self.status: int | None = None
        """HTTP status, or None when no response arrived."""
        self.headers: Headers | None = None
        self.head_bytes = 0
        """Bytes of the response head as read (its status line and headers), counted by the
        connection while it parses them: the recorder's queue counts it without a pass over
        the headers."""
        self.body: bytes | None = None
        """The body as received (content-encoding not undone), up to the recording cap."""
        self.body_size = 0
        """Bytes of body received in all, also past the cap."""
        self.body_truncated = False
        self.latency_ms: float | None = None
        """From sending the request to the end of the response (or the failure)."""
        self.error_kind: str | None = None
        """None, or why there is no (complete) response: an ``ErrorKind`` word."""
        self.error: str | None = None
        """The human-readable detail beside ``error_kind`` ('connect: Connection refused')."""
        self.stream: StreamArrivals | None = None
        """Set when the response head said ``text/event-stream``: its pieces' arrivals."""
        self.answered_status: int | None = None
        """Set by the primary's call when it fails: the status the client got, which the
        record alone cannot tell (the primary's, when its head went out before the failure,
        with or without body bytes; else the proxy's own 502/504 or refusal)."""

    def capture(self, chunks: list[bytes], data: bytes, cap: int) -> None:
        """Count a piece of body, and keep it in ``chunks`` up to ``cap`` bytes in all."""
        room = cap - self.body_size
        self.body_size += len(data)
        if keep_piece(chunks, data, room):
            self.body_truncated = True


class Exchange:
    """One routed client request, with its primary and shadow outcomes."""

    __slots__ = (
        "body",
        "body_size",
        "body_truncated",
        "client_addr",
        "config_version",
        "head_bytes",
        "headers",
        "id",
        "method",
        "path",
        "pending",
        "query",
        "received_at",
        "recorder",
        "request_id",
        "request_stored",
        "responses",
        "route",
        "rules",
    )

    def __init__(self, route: str, received_at: float, method: str, path: str, query: str,
                 headers: Headers, client_addr: str | None, request_id: str | None) -> None:
        self.id = record_ids.next()
        """The record's key: replaying a spooled record twice stores it once."""
        self.request_id = request_id or str(self.id)
        """The X-Request-Id sent to every upstream and back to the client."""
        self.route = route
        self.received_at = received_at
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.head_bytes = 0
        """Bytes of the request head as read (the target and the headers), counted while
        it was parsed (see ``CapturedResponse.head_bytes``)."""
        self.body = b""
        self.body_size = 0
        self.body_truncated = False
        self.client_addr = client_addr
        self.responses: list[CapturedResponse] = []
        self.pending = 0
        """Upstream calls not finished yet; the record is handed on when it reaches 0."""
        self.recorder: RecordSink | None = None
        """Where ``finish_call`` submits the finished exchange."""
        self.config_version: str | None = None
        """The configuration the request arrived under (``reload.config_version``); the
        recorder stores it."""
        self.rules: RowEncoder | None = None
        """The recording rules of that configuration, held from its route until the record
        is encoded (None: the recorder's running rules)."""
        self.request_stored = False
        """True when the request row is in the database already (``id`` is its key) and
        only ``responses`` are to be stored: ``shadowproxy replay``'s answers."""

    def capture(self, chunks: list[bytes], data: bytes, cap: int) -> None:
        """Count a piece of a request body that arrives in pieces, and keep it in ``chunks``
        up to ``cap`` bytes in all (``body`` is set from them when the body ends)."""
        room = cap - self.body_size
        self.body_size += len(data)
        if keep_piece(chunks, data, room):
            self.body_truncated = True

    def hold(self) -> None:
        """Count the request itself as unfinished (its body still arrives): the record is
        handed on only after a matching ``finish_call``."""
        self.pending += 1

    def start_call(self, response: CapturedResponse) -> None:
        """Count one more upstream call that must finish before the record is complete."""
        self.responses.append(response)
        self.pending += 1

    def finish_call(self) -> None:
        """One call finished; the last one hands the exchange to the recorder."""
        self.pending -= 1
        if self.pending == 0 and self.recorder is not None:
            self.recorder.submit(self)
