"""Recorded traffic for the replay tests, and the replay command run as a real process.

Records are written by the recorder's own encoder and writer (``RowEncoder``,
``PostgresWriter``), so they are stored exactly as the proxy stores them; tests that need the
proxy's own capture (redaction, truncation) record through a real proxy instead.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from shadowproxy.config import RecordingConfig
from shadowproxy.models import CapturedResponse, Exchange
from shadowproxy.recorder.postgres import PostgresWriter
from shadowproxy.recorder.rows import RowEncoder
from tests.db import fetchval

ROOT = Path(__file__).resolve().parents[2]
ROUTE = "r"


def request(i: int, *, received_at: float | None = None, route: str = ROUTE,
            method: str = "POST", path: str = "/predict", query: str = "",
            headers: list[tuple[bytes, bytes]] | None = None, body: Any = None,
            primary_status: int = 200, shadows: Iterable[str] = ()) -> Exchange:
    """A recorded exchange: request ``i`` with features {"x": i}, the primary's answer
    (prediction x) and, for each name in ``shadows``, a live shadow's (prediction 2x)."""
    ex = Exchange(route, time.time() - 60 if received_at is None else received_at, method,
                  path, query, headers if headers is not None else
                  [(b"Content-Type", b"application/json"), (b"Host", b"models.example")],
                  "10.0.0.7", f"req-{i:05d}")
    ex.body = orjson.dumps({"features": {"x": i}} if body is None else body)
    ex.body_size = len(ex.body)
    answers = [("primary", "primary", primary_status, i)]
    answers += [(name, "shadow", 200, 2 * i) for name in shadows]
    for target, role, status, prediction in answers:
        resp = CapturedResponse(target, role, ex.received_at)
        resp.status = status
        resp.headers = [(b"Content-Type", b"application/json")]
        resp.body = orjson.dumps({"prediction": prediction})
        resp.body_size = len(resp.body)
        resp.latency_ms = 1.0
        ex.responses.append(resp)
    return ex


async def store(url: str, exchanges: list[Exchange],
                recording: RecordingConfig | None = None) -> None:
    """Store the exchanges as the recorder does."""
    writer = PostgresWriter(url)
    try:
        await writer.write(*RowEncoder(recording or RecordingConfig()).encode(exchanges))
    finally:
        await writer.close()


def write_config(tmp_path: Path, database_url: str, primary_url: str = "http://127.0.0.1:9",
                 *, shadows: list[dict[str, Any]] | None = None,
                 compare: dict[str, Any] | None = None,
                 recording: dict[str, Any] | None = None,
                 limits: dict[str, Any] | None = None) -> Path:
    """A config for route ``r`` recording to the test database."""
    route: dict[str, Any] = {"name": ROUTE, "primary": {"url": primary_url},
                             "shadows": shadows or []}
    if compare is not None:
        route["compare"] = compare
    data: dict[str, Any] = {"data_dir": str(tmp_path / "data"),
                            "database": {"url": database_url}, "routes": [route]}
    if recording is not None:
        data["recording"] = recording
    if limits is not None:
        data["limits"] = limits
    path = tmp_path / "shadowproxy.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@dataclass
class Result:
    status: int
    out: str
    err: str


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SHADOWPROXY_DATABASE_URL"}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _as_from_a_terminal() -> None:
    """SIGINT back to its default in the child: a shell starts a background job (pytest
    run with ``&``) with SIGINT ignored, its children inherit that, and Python then leaves
    Ctrl-C ignored, as a command run in the background should."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def start_cli(*args: str) -> asyncio.subprocess.Process:
    """``python -m shadowproxy ARGS`` as a child process (the test's loop keeps serving)."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shadowproxy", *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(), cwd=ROOT,
        preexec_fn=_as_from_a_terminal)


async def finish(proc: asyncio.subprocess.Process, timeout: float = 60.0) -> Result:
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def cli(*args: str, timeout: float = 60.0) -> Result:
    """Run ``shadowproxy ARGS`` to its end."""
    return await finish(await start_cli(*args), timeout)


async def replay(config: Path, *args: str, to: str, name: str = "cand",
                 timeout: float = 60.0) -> Result:
    """``shadowproxy replay`` of route r (over the last hour unless ``args`` give a
    window), to ``to`` as ``name``."""
    window = [] if {"--from", "--since"} & set(args) else ["--since", "1h"]
    return await cli("replay", "-c", str(config), "--route", ROUTE, "--to", to, "--as", name,
                     *window, *args, timeout=timeout)


async def answers(url: str, name: str = "cand") -> int:
    """Stored answers of target ``name``."""
    count: int = await fetchval(
        url, "SELECT count(*) FROM shadowproxy.responses WHERE target = $1", name)
    return count
