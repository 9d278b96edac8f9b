"""Structured logs: one JSON object per line, the request id on every line about a request."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

import aiohttp

from shadowproxy.logs import JsonFormatter, TextFormatter, Throttle
from tests.test_run_command import wait_ready, write_config
from tests.upstreams import model, serve


async def test_json_access_log_carries_the_request_id(tmp_path: Path, database_url: str) -> None:
    """With access_log and --log-format json, every line parses and each request has a line
    with its X-Request-Id, route and every call's outcome."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow:
        config, port, admin = write_config(tmp_path, primary.url, shadow.url, database_url,
                                           access_log=True)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shadowproxy", "run", "-c", str(config), "--log-format",
            "json", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "SHADOWPROXY_DATABASE_URL": ""})
        await wait_ready(admin, proc)
        ids = []
        async with aiohttp.ClientSession() as http:
            for i in range(3):
                resp = await http.post(f"http://127.0.0.1:{port}/p?i={i}", json={})
                ids.append(resp.headers["X-Request-Id"])
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.stderr is not None
        err = await asyncio.wait_for(proc.stderr.read(), 20)
        assert await proc.wait() == 0
    events = [json.loads(line) for line in err.decode().splitlines() if line.strip()]
    access = [e for e in events if e["logger"] == "shadowproxy.access"]
    assert sorted(e["request_id"] for e in access) == sorted(ids)
    for event in access:
        assert event["route"] == "r"
        assert event["calls"]["primary"]["status"] == 200
        assert event["calls"]["c"]["status"] == 200
        assert event["message"].startswith("POST /p?i=")
    assert any(e["message"].startswith("stopped:") for e in events)


def test_text_lines_end_with_the_request_id() -> None:
    """In text logs, a line about a request ends with request_id=..."""
    record = logging.LogRecord("shadowproxy.access", logging.INFO, __file__, 1, "GET / -> 200",
                               None, None)
    record.request_id = "abc"
    assert TextFormatter("%(message)s").format(record) == "GET / -> 200 request_id=abc"
    assert json.loads(JsonFormatter().format(record))["request_id"] == "abc"


def test_throttle_lets_a_few_lines_through_per_period_and_counts_the_rest() -> None:
    """An event a client can cause at will is logged at most `limit` times a period; the
    next line let through says how many were held back."""
    throttle = Throttle(limit=3, period_s=60.0)
    assert [throttle.allow(now=t) for t in (0.0, 1.0, 2.0)] == [(True, 0)] * 3
    assert [throttle.allow(now=t) for t in (3.0, 4.0, 59.0)] == [(False, 0)] * 3
    assert throttle.allow(now=60.0) == (True, 3)
    assert throttle.allow(now=61.0) == (True, 0)
