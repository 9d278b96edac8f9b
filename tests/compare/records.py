"""Writing realistic exchange records straight into the fixture database, as the proxy does.

One ``shadowproxy.requests`` row per exchange, a ``responses`` row for the primary (target
and role 'primary'), one per shadow (role 'shadow') and one per replayed target (role
'replay', as ``shadowproxy replay`` stores them); ``body_json`` holds the JSON and ``body``
its bytes, as the recorder stores them. A streamed answer is a ``Call`` with the assembled
``body`` (what ``shadowproxy.streams.assemble`` gives) and its ``stream`` timing (the
``responses.stream`` column), or, as stored before streams were assembled, ``raw`` bytes
with no JSON and an event-stream ``headers``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from shadowproxy.failures import kind_of_legacy_error
from shadowproxy.recorder.rows import REQUEST_COLUMNS, RESPONSE_COLUMNS


@dataclass
class Call:
    """One upstream's answer: a JSON body (or none), status, latency, error and its kind.

    Without ``kind`` the kind is read from the error text, as migration 004 does.
    """

    body: Any = None
    status: int | None = 200
    latency_ms: float | None = 10.0
    error: str | None = None
    kind: str | None = None
    stream: dict[str, Any] | None = None
    headers: dict[str, str] | None = None
    raw: bytes | None = None
    """The stored bytes when they are not ``body``'s JSON (``body_json`` stays NULL)."""


@dataclass
class Exchange:
    """A request and the primary's and shadows' answers."""

    request: Any
    primary: Call
    shadows: dict[str, Call] = field(default_factory=dict)
    replays: dict[str, Call] = field(default_factory=dict)
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    received_at: datetime = field(
        default_factory=lambda: datetime.now(UTC) - timedelta(minutes=5))
    route: str = "house-prices"
    path: str = "/predict"
    config_version: str | None = None


def _body(value: Any) -> tuple[bytes | None, str | None]:
    if value is None:
        return None, None
    text = json.dumps(value)
    return text.encode(), text


# The stream column goes with the recorder's columns, whether or not the recorder writes it.
COLUMNS = RESPONSE_COLUMNS if "stream" in RESPONSE_COLUMNS else (*RESPONSE_COLUMNS, "stream")


async def insert(url: str, exchanges: list[Exchange]) -> None:
    """COPY the exchanges into requests and responses."""
    requests, responses = [], []
    for ex in exchanges:
        rid = uuid.uuid4()
        body, text = _body(ex.request)
        requests.append((rid, ex.request_id, ex.route, ex.received_at, "POST", ex.path, "",
                         "{}", body, text, len(body or b""), False, "127.0.0.1",
                         ex.config_version))
        for target, role, call in [("primary", "primary", ex.primary)] + [
                (name, "shadow", c) for name, c in ex.shadows.items()] + [
                (name, "replay", c) for name, c in ex.replays.items()]:
            rbody, rtext = _body(call.body)
            if call.raw is not None:
                rbody, rtext = call.raw, None
            row = {"request": rid, "target": target, "role": role, "status": call.status,
                   "headers": json.dumps(call.headers or {}), "body": rbody, "body_json": rtext,
                   "body_size": len(rbody or b""), "body_truncated": False,
                   "latency_ms": call.latency_ms, "error": call.error,
                   "started_at": ex.received_at,
                   "error_kind": call.kind or kind_of_legacy_error(call.error),
                   "stream": None if call.stream is None else json.dumps(call.stream),
                   "received_at": ex.received_at}
            responses.append(tuple(row[c] for c in COLUMNS))
    conn = await asyncpg.connect(url)
    try:
        await conn.copy_records_to_table("requests", schema_name="shadowproxy",
                                         records=requests, columns=REQUEST_COLUMNS)
        await conn.copy_records_to_table("responses", schema_name="shadowproxy",
                                         records=responses, columns=COLUMNS)
    finally:
        await conn.close()


def write_config(tmp_path: Path, url: str, compare: str, *, shadows: tuple[str, ...] = (
        "candidate",), route: str = "house-prices") -> Path:
    """A config file for the fixture database with the given ``compare:`` YAML block."""
    shadow_yaml = "".join(
        f"      - name: {name}\n        url: http://127.0.0.1:{9002 + i}\n"
        for i, name in enumerate(shadows))
    indented = "".join(f"      {line}\n" for line in compare.strip().splitlines())
    path = tmp_path / "shadowproxy.yaml"
    path.write_text(
        f"database:\n  url: {url!r}\ndata_dir: {str(tmp_path / 'data')!r}\n"
        f"routes:\n  - name: {route}\n    primary: {{url: 'http://127.0.0.1:9001'}}\n"
        f"    shadows:\n{shadow_yaml}    compare:\n{indented}")
    return path
