"""Reloads under load, through every trigger, in single and worker mode: a client sends at
full speed while the file is rewritten and reloaded 20 times (a shadow's sample_rate 0 and 1,
a second shadow added and removed, a redaction rule changed), and once to an invalid file.

Each run takes DURATION_S seconds of traffic (the issue asks for 20; 8 keeps the suite's
time budget) or as long as the 20 reloads take, whichever is longer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from shadowproxy.config import load_config
from shadowproxy.reload import config_version
from tests.db import fetch
from tests.test_admin import samples
from tests.test_run_command import free_port, wait_ready
from tests.test_workers import supervisor
from tests.upstreams import Upstream, model, serve

pytestmark = pytest.mark.slow

DURATION_S = 8.0
RELOADS = 20
CLIENTS = 6


def config(i: int, *, port: int, admin: int, tmp_path: Path, database_url: str,
           primary: str, s1: str, s2: str, workers: int, watch: bool) -> dict[str, Any]:
    """The i-th configuration: s1 at sample_rate i % 2, s2 there when (i // 2) % 2, the
    request's $.secret redacted when (i // 4) % 2."""
    shadows = [{"name": "s1", "url": s1, "sample_rate": float(i % 2)}]
    if (i // 2) % 2:
        shadows.append({"name": "s2", "url": s2})
    return {
        "listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}",
        "data_dir": str(tmp_path / "data"), "database": {"url": database_url},
        "workers": workers, "watch": watch, "watch_interval_s": 0.05,
        "recording": {"flush_interval_ms": 50,
                      "redact_json": ["$.secret"] if (i // 4) % 2 else []},
        "routes": [{"name": "r", "primary": {"url": primary}, "shadows": shadows}],
    }


def expected(i: int) -> tuple[frozenset[str], bool]:
    """The shadows called and whether $.secret is redacted under the i-th configuration."""
    shadows = {"s1"} if i % 2 else set()
    if (i // 2) % 2:
        shadows.add("s2")
    return frozenset(shadows), bool((i // 4) % 2)


class Client:
    """CLIENTS keep-alive connections sending as fast as the proxy answers."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answered: list[str] = []
        self.errors: list[str] = []
        self.connections = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async def counted(*_: object) -> None:
            self.connections += 1

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(counted)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS),
                                         trace_configs=[trace]) as http:
            await asyncio.gather(*(self._loop(http, n) for n in range(CLIENTS)))

    async def _loop(self, http: aiohttp.ClientSession, n: int) -> None:
        for i in itertools.count():
            if self.stop.is_set():
                return
            rid = f"c{n}-{i}"
            try:
                resp = await http.post(f"http://127.0.0.1:{self.port}/p",
                                       headers={"X-Request-Id": rid},
                                       json={"features": {"a": i}, "secret": "s3cret"})
                await resp.read()
                if resp.status == 200:
                    self.answered.append(rid)
                else:
                    self.errors.append(f"{rid}: status {resp.status}")
            except (aiohttp.ClientError, OSError) as exc:
                self.errors.append(f"{rid}: {exc!r}")


async def _metrics(http: aiohttp.ClientSession, admin: int) -> dict[Any, float]:
    return samples(await (await http.get(f"http://127.0.0.1:{admin}/metrics")).text())


async def _rejected(http: aiohttp.ClientSession, admin: int) -> float:
    return (await _metrics(http, admin)).get(
        ("shadowproxy_config_reloads_total", (("result", "rejected"),)), 0.0)


async def _wait_running(http: aiohttp.ClientSession, admin: int, version: str) -> None:
    """Until /readyz says ``version`` runs (in every worker)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ready = await (await http.get(f"http://127.0.0.1:{admin}/readyz")).json()
        workers = ready.get("workers_config")
        if ready.get("config_version") == version and (
                workers is None or (workers and all(w["config_version"] == version
                                                    for w in workers))):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"version {version} never ran everywhere: {ready}")


async def _cli_reload(path: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shadowproxy", "reload", "-c", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SHADOWPROXY_DATABASE_URL": ""})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _trigger(trigger: str, http: aiohttp.ClientSession, pid: int, admin: int,
                   path: Path) -> None:
    if trigger == "SIGHUP":
        os.kill(pid, signal.SIGHUP)
    elif trigger == "POST":
        resp = await http.post(f"http://127.0.0.1:{admin}/-/reload")
        assert resp.status == 200, await resp.text()
    elif trigger == "reload":
        status, out, err = await _cli_reload(path)
        assert status == 0 and out.startswith("applied: version"), (status, out, err)
    # "watch": the proxy sees the new content by itself


async def _reject(trigger: str, http: aiohttp.ClientSession, pid: int, admin: int,
                  path: Path) -> None:
    """Write an invalid file, reload it through ``trigger``, see it rejected with FILE:LINE
    errors and counted, and nothing changed."""
    before = await _rejected(http, admin)
    version = (await (await http.get(f"http://127.0.0.1:{admin}/readyz")).json())[
        "config_version"]
    text = path.read_text()
    path.write_text(re.sub(r"sample_rate: \d\.\d", "sample_rate: 7.0", text, count=1))
    if trigger == "SIGHUP":
        os.kill(pid, signal.SIGHUP)
    elif trigger == "POST":
        resp = await http.post(f"http://127.0.0.1:{admin}/-/reload")
        assert resp.status == 422
        errors = (await resp.json())["errors"]
        assert errors and all(e.startswith(f"{path}:") for e in errors), errors
    elif trigger == "reload":
        status, _, err = await _cli_reload(path)
        assert status == 2 and f"{path}:" in err, (status, err)
    deadline = time.monotonic() + 10
    while await _rejected(http, admin) < before + 1:
        assert time.monotonic() < deadline, "the invalid file was not rejected"
        await asyncio.sleep(0.02)
    ready = await (await http.get(f"http://127.0.0.1:{admin}/readyz")).json()
    assert ready["config_version"] == version


async def _run(tmp_path: Path, database_url: str, triggers: list[str], *, workers: int,
               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHADOWPROXY_DATABASE_URL", raising=False)
    watch = triggers == ["watch"]
    path = tmp_path / "shadowproxy.yaml"
    async with serve(model("v1")) as primary, serve(model("v2")) as s1, \
            serve(model("v3")) as s2:
        # Chosen after the upstreams bound theirs: a port just released can be handed to
        # the next bind to port 0.
        port, admin = free_port(), free_port()
        def write(i: int) -> str:
            data = config(i, port=port, admin=admin, tmp_path=tmp_path,
                          database_url=database_url, primary=primary.url, s1=s1.url,
                          s2=s2.url, workers=workers, watch=watch)
            path.write_text(yaml.safe_dump(data))
            return config_version(load_config(path))

        versions = {write(0): expected(0)}
        async with supervisor(path) as proc, aiohttp.ClientSession() as http:
            await wait_ready(admin, proc)
            assert proc.pid is not None
            client = Client(port)
            sending = asyncio.ensure_future(client.run())
            started = time.monotonic()
            for i in range(1, RELOADS + 1):
                trigger = triggers[i % len(triggers)]
                if i == RELOADS // 2:
                    await _reject(trigger, http, proc.pid, admin, path)
                version = write(i)
                versions[version] = expected(i)
                await _trigger(trigger, http, proc.pid, admin, path)
                await _wait_running(http, admin, version)
                await asyncio.sleep(max(0.0, started + DURATION_S * i / RELOADS
                                        - time.monotonic()))
            client.stop.set()
            await sending
            metrics = await _metrics(http, admin)
            if workers > 1:
                _check_handed_on(tmp_path / "data" / "run" / "config.json", version)
            os.kill(proc.pid, signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert client.errors == []
    assert client.connections == CLIENTS, "a client connection was closed"
    assert metrics[("shadowproxy_config_reloads_total", (("result", "applied"),))] == RELOADS
    assert metrics[("shadowproxy_config_reloads_total", (("result", "rejected"),))] == 1
    await _check_records(database_url, client.answered, versions, s1, s2)


def _check_handed_on(path: Path, version: str) -> None:
    """The configuration handed to the workers is private to the user and holds neither the
    database URL nor the admin token."""
    assert path.stat().st_mode & 0o777 == 0o600
    handed = json.loads(path.read_text())
    assert handed["version"] == version
    assert "database" not in handed["settings"] and "admin_token" not in handed["settings"]


async def _check_records(database_url: str, answered: list[str],
                         versions: dict[str, tuple[frozenset[str], bool]],
                         s1: Upstream, s2: Upstream) -> None:
    """Every answered request recorded once, with the shadows and redaction of its
    configuration version; each shadow called for exactly the requests that say so."""
    rows = await fetch(database_url, """
        SELECT q.request_id, q.config_version, q.body_json->>'secret' AS secret,
               array_agg(s.target) FILTER (WHERE s.role = 'shadow') AS shadows,
               bool_and(s.status = 200 AND s.error_kind IS NULL) AS all_ok
        FROM shadowproxy.requests q
        JOIN shadowproxy.responses s ON s.request = q.id AND s.received_at = q.received_at
        GROUP BY q.id, q.received_at""")
    assert len(rows) == len(answered) > 1000
    assert {r["request_id"] for r in rows} == set(answered)
    called: dict[str, set[str]] = {"s1": set(), "s2": set()}
    used = set()
    for r in rows:
        shadows, redacted = versions[r["config_version"]]
        used.add(r["config_version"])
        assert frozenset(r["shadows"] or ()) == shadows, r
        assert r["secret"] == ("[redacted]" if redacted else "s3cret"), r
        assert r["all_ok"], r
        for name in shadows:
            called[name].add(r["request_id"])
    assert len(used) >= 8
    assert {s.headers["x-request-id"] for s in s1.seen} == called["s1"]
    assert {s.headers["x-request-id"] for s in s2.seen} == called["s2"]
    assert len(s1.seen) == len(called["s1"]) and len(s2.seen) == len(called["s2"])


@pytest.mark.parametrize("trigger", ["SIGHUP", "reload", "POST", "watch"])
async def test_reloads_under_load_lose_nothing(
        trigger: str, tmp_path: Path, database_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Through this trigger, 20 reloads and one invalid file under full-speed traffic: no
    client error, no client connection closed, every answered request recorded once, with
    the shadows called and the redaction of the configuration version recorded with it."""
    await _run(tmp_path, database_url, [trigger], workers=1, monkeypatch=monkeypatch)


async def test_reloads_under_load_reach_every_worker(
        tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with workers: 2 (SIGHUP, POST /-/reload and shadowproxy reload in turn):
    every reload reaches both workers, and each request is served and recorded under the
    version recorded with it."""
    await _run(tmp_path, database_url, ["SIGHUP", "POST", "reload"], workers=2,
               monkeypatch=monkeypatch)

