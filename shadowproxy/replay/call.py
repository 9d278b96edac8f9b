"""The replay's upstream call: the target's answer captured as a record, like a shadow's.

A subclass of the data path's ``UpstreamCall`` (raw protocol, httptools parser, keep-alive
pool), so it is compiled with the data path (``shadowproxy/build.py``): a compiled class
can only be subclassed by compiled code.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from shadowproxy.failures import ErrorKind
from shadowproxy.models import CapturedResponse, Exchange, Headers
from shadowproxy.upstream import UpstreamCall, UpstreamConnection


class ReplayCall(UpstreamCall):
    """One replayed request; ``on_done(call)`` runs once when the answer (or failure) is in."""

    __slots__ = ("capture_cap", "chunks", "exchange", "on_done", "record")

    def __init__(self, head: bytes, body: bytes, timeout: float, expect_no_body: bool,
                 exchange: Exchange, record: CapturedResponse, capture_cap: int,
                 on_done: Callable[[ReplayCall], None]) -> None:
        super().__init__(head, body, timeout, expect_no_body)
        self.exchange = exchange
        self.record = record
        self.capture_cap = capture_cap
        self.on_done = on_done
        self.chunks: list[bytes] = []

    def on_response_head(self, status: int, reason: bytes, headers: Headers,
                         conn: UpstreamConnection) -> None:
        self.record.status = status
        self.record.headers = headers

    def on_response_body(self, data: bytes) -> None:
        self.record.capture(self.chunks, data, self.capture_cap)

    def _close(self) -> None:
        record = self.record
        record.latency_ms = (time.perf_counter() - self.sent_at) * 1000.0
        record.body = b"".join(self.chunks) if self.chunks else b""
        self.chunks = []
        self.on_done(self)

    def on_response_end(self) -> None:
        self._close()

    def on_failure(self, kind: ErrorKind, detail: str) -> None:
        self.record.error_kind = kind
        self.record.error = detail
        self._close()
