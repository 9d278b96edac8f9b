"""The replay's upstream call: the target's answer captured as a record, like a shadow's.

A subclass of the data path's ``UpstreamCall`` (raw protocol, httptools parser, keep-alive
pool), so it is compiled with the data path (``shadowproxy/build.py``): a compiled class
can only be subclassed by compiled code.
"""

from __future__ import annotations

from collections.abc import Callable

from shadowproxy.failures import ErrorKind
from shadowproxy.models import CapturedResponse, Exchange
from shadowproxy.upstream import UpstreamCall


class ReplayCall(UpstreamCall):
    """One replayed request; ``on_done(call)`` runs once when the answer (or failure) is in."""

    __slots__ = ("on_done",)

    def __init__(self, exchange: Exchange, record: CapturedResponse, head: bytes, body: bytes,
                 timeout: float, head_only: bool, may_resend: bool, capture_cap: int,
                 max_duration: float, on_done: Callable[[ReplayCall], None]) -> None:
        super().__init__(exchange, record, head, body, timeout, head_only, may_resend,
                         capture_cap)
        self.max_duration = max_duration
        self.on_done = on_done

    def on_response_end(self) -> None:
        self.close_record()
        self.on_done(self)

    def on_failure(self, kind: ErrorKind, detail: str) -> None:
        self.close_record()
        self.on_done(self)
