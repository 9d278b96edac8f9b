"""The access log: one line per exchange, written by the recorder, off the client's path.

Each line carries the request id, method, path and query (``recording.redact_query``
applied), route, the configuration version the request was served under, the status the
client got, the total duration, the body bytes in and out, and every upstream call's
target, status, latency and failure kind. In text logs the message says it all (``POST
/p?x=1 -> 200 route=r config=3f2a9c01b7e4 duration_ms=3.21 bytes_in=12 bytes_out=40
primary=200:2.90ms c=-/timeout:200.13ms request_id=…``); in JSON logs the same values are
fields of the event as well (``config_version``). Nothing of a body or a header is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from shadowproxy.failures import ErrorKind
from shadowproxy.models import CapturedResponse, Exchange

access_log = logging.getLogger("shadowproxy.access")


def client_status(primary: CapturedResponse | None) -> int | None:
    """The status the client was answered with, as ``primary.PrimaryCall`` decided it: the
    primary's, once its head went out (the response complete, or cut after the head, which
    goes out before any body); else the proxy's own answer (``answered_status``)."""
    if primary is None:
        return None
    if primary.answered_status is not None:
        return primary.answered_status
    if primary.error_kind is None:
        return primary.status
    return 504 if primary.error_kind == ErrorKind.TIMEOUT else 502


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def fields(ex: Exchange, query: str) -> dict[str, Any]:
    """The values of one access-log line (``query`` already redacted)."""
    primary = next((r for r in ex.responses if r.role == "primary"), None)
    status = client_status(primary)
    duration = bytes_out = None
    if primary is not None:
        if primary.latency_ms is not None:
            # From the request's first byte to the end of the primary's response, which
            # the client's response ends with (it is relayed as it arrives).
            duration = (primary.started_at - ex.received_at) * 1000.0 + primary.latency_ms
        if status is not None and status == primary.status:
            bytes_out = primary.body_size  # a proxy-made 502/504 is not the primary's body
    return {
        "route": ex.route, "config_version": ex.config_version, "method": ex.method,
        "path": ex.path, "query": query,
        "status": status, "duration_ms": _ms(duration), "bytes_in": ex.body_size,
        "bytes_out": bytes_out, "client_addr": ex.client_addr,
        "calls": {r.target: {"status": r.status, "latency_ms": _ms(r.latency_ms),
                             "error_kind": r.error_kind, "error": r.error}
                  for r in ex.responses},
    }


def _call(target: str, call: dict[str, Any]) -> str:
    text = f"{target}={call['status'] if call['status'] is not None else '-'}"
    if call["error_kind"] is not None:
        text += f"/{call['error_kind']}"
    if call["latency_ms"] is not None:
        text += f":{call['latency_ms']:.2f}ms"
    return text


def _value(value: Any) -> str:
    return "-" if value is None else str(value)


def log_exchanges(exchanges: list[Exchange], redact_query: Callable[[str], str]) -> None:
    """One access-log line per exchange."""
    for ex in exchanges:
        query = redact_query(ex.query)
        event = fields(ex, query)
        access_log.info(
            "%s %s%s -> %s route=%s config=%s duration_ms=%s bytes_in=%s bytes_out=%s %s",
            ex.method, ex.path, "?" + query if query else "", _value(event["status"]),
            ex.route, _value(ex.config_version), _value(event["duration_ms"]),
            event["bytes_in"],
            _value(event["bytes_out"]),
            " ".join(_call(target, call) for target, call in event["calls"].items()),
            extra={"request_id": ex.request_id, **event})
