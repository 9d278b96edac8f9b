"""Reloading the configuration of a running proxy: each request under one configuration,
pools kept or retired, invalid files refused, restart-only settings kept, watch."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from shadowproxy.app import Proxy, running
from shadowproxy.config import load_config
from shadowproxy.reload import config_version
from tests.db import execute, fetch
from tests.proxy.test_data_path import wait_for_rows
from tests.test_admin import samples
from tests.upstreams import hanging, model, serve


def base_config(tmp_path: Path, primary: str, shadows: list[dict[str, Any]] | None = None,
                **extra: Any) -> dict[str, Any]:
    return {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
            "data_dir": str(tmp_path / "data"),
            "recording": {"flush_interval_ms": 50}, "limits": {"shutdown_grace_s": 2},
            "routes": [{"name": "r", "primary": {"url": primary, "timeout_s": 5},
                        "shadows": shadows or []}],
            **extra}


def write(path: Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config))


@contextlib.asynccontextmanager
async def live_proxy(tmp_path: Path, database_url: str, config: dict[str, Any]
                     ) -> AsyncIterator[tuple[Proxy, Path]]:
    """A proxy started from a config file it can reload."""
    path = tmp_path / "shadowproxy.yaml"
    write(path, config)
    async with running(load_config(path), database_url, config_path=path) as proxy:
        yield proxy, path


async def reload_with(proxy: Proxy, path: Path, config: dict[str, Any]) -> Any:
    write(path, config)
    return await proxy.reload("test")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines
                  if line.lower().startswith("content-length:"))
    return int(lines[0].split()[1]), await asyncio.wait_for(reader.readexactly(length), 5)


async def test_a_request_keeps_the_configuration_its_head_arrived_under(
        tmp_path: Path, database_url: str) -> None:
    """A request whose head arrived before a reload and whose body after it is mirrored,
    redacted (body and query) and recorded under the old configuration (and its version);
    the next request under the new one."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow:
        old = base_config(tmp_path, primary.url, [{"name": "s", "url": shadow.url}],
                          recording={"flush_interval_ms": 50, "redact_query": []})
        new = base_config(tmp_path, primary.url, [],
                          recording={"flush_interval_ms": 50, "redact_json": ["$.secret"],
                                     "redact_query": ["token"]})
        async with live_proxy(tmp_path, database_url, old) as (proxy, path):
            old_version = proxy.version
            body = json.dumps({"features": {"a": 1}, "secret": "s3cret"}).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"POST /p?token=t0k HTTP/1.1\r\nHost: x\r\nX-Request-Id: before\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
            await writer.drain()
            await asyncio.sleep(0.2)  # the head is parsed
            outcome = await reload_with(proxy, path, new)
            assert outcome.result == "applied"
            writer.write(body[10:])
            status, _ = await read_response(reader)
            assert status == 200
            writer.write(b"POST /p?token=t0k HTTP/1.1\r\nHost: x\r\nX-Request-Id: after\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            status, _ = await read_response(reader)
            assert status == 200
            writer.close()
            await wait_for_rows(database_url, "responses", 3)
            await proxy.recorder.drained()
    rows = {r["request_id"]: r for r in await fetch(
        database_url, "SELECT q.request_id, q.config_version, q.body_json->>'secret' AS secret, "
        "q.query, array_agg(s.target ORDER BY s.target) AS targets FROM shadowproxy.requests q "
        "JOIN shadowproxy.responses s ON s.request = q.id GROUP BY 1, 2, 3, 4")}
    assert len(shadow.seen) == 1 and shadow.seen[0].headers["x-request-id"] == "before"
    assert rows["before"]["config_version"] == old_version
    assert rows["before"]["secret"] == "s3cret"
    assert rows["before"]["query"] == "token=t0k"
    assert rows["before"]["targets"] == ["primary", "s"]
    assert rows["after"]["config_version"] == outcome.version != old_version
    assert rows["after"]["secret"] == "[redacted]"
    assert rows["after"]["query"] == "token=[redacted]"
    assert rows["after"]["targets"] == ["primary"]


class CountingUpstream:
    """An HTTP/1.1 upstream that counts the connections made to it and those still open;
    answers after ``delay`` seconds, keeping the connection alive; ``pad`` bytes of an extra
    header make its response head that much larger."""

    def __init__(self, delay: float = 0.0, pad: int = 0) -> None:
        self.delay = delay
        self.pad = b"X-Pad: %s\r\n" % (b"a" * pad) if pad else b""
        self.opened = 0
        self.open = 0
        self.url = ""
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        self.open += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                await asyncio.sleep(self.delay)
                body = b'{"prediction": 1}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             + self.pad + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def __aenter__(self) -> CountingUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


async def test_unchanged_upstreams_keep_their_connections_across_reloads(
        tmp_path: Path, database_url: str) -> None:
    """Ten reloads that change a shadow's timeout and headers and add and remove another
    shadow leave the primary's and the kept shadow's keep-alive connection in place: one
    connection each for all requests, and the client's connection is never closed."""
    async with CountingUpstream() as primary, CountingUpstream() as kept, \
            CountingUpstream() as other:
        def config(i: int) -> dict[str, Any]:
            shadows = [{"name": "kept", "url": kept.url, "timeout_s": 2 + i % 2,
                        "set_headers": {"X-Config": str(i)}}]
            if i % 2:
                shadows.append({"name": "other", "url": other.url})
            return base_config(tmp_path, primary.url, shadows)

        connections = 0

        async def counted(*_: object) -> None:
            nonlocal connections
            connections += 1

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(counted)
        async with live_proxy(tmp_path, database_url, config(0)) as (proxy, path), \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                      trace_configs=[trace]) as http:
            kept_calls = proxy.metrics.shadow("r", "kept").outcomes
            sent = 0
            for i in range(1, 11):
                assert (await reload_with(proxy, path, config(i))).result == "applied"
                for _ in range(3):
                    resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", json={})
                    assert resp.status == 200
                    await resp.read()
                    sent += 1
                    # The shadow call outlives the client's answer: let it end (its
                    # connection back in the pool) so that the next one can reuse it.
                    for _ in range(200):
                        if kept_calls["ok"] == sent:
                            break
                        await asyncio.sleep(0.005)
                    assert kept_calls["ok"] == sent
            await asyncio.sleep(0.2)
            assert other.open == 0, "the retired shadow's idle connection stayed open"
    assert primary.opened == 1
    assert kept.opened == 1
    assert connections == 1


async def test_a_removed_upstream_finishes_its_call_then_closes(
        tmp_path: Path, database_url: str) -> None:
    """A shadow removed while its call is in flight answers that call (recorded as a success,
    not a shutdown), and its connection is closed once the call ends."""
    async with serve(model("v1")) as primary, CountingUpstream(delay=0.5) as slow:
        with_shadow = base_config(tmp_path, primary.url, [{"name": "slow", "url": slow.url}])
        async with live_proxy(tmp_path, database_url, with_shadow) as (proxy, path), \
                aiohttp.ClientSession() as http:
            resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", json={})
            assert resp.status == 200
            await asyncio.sleep(0.1)
            assert slow.open == 1
            await reload_with(proxy, path, base_config(tmp_path, primary.url))
            await wait_for_rows(database_url, "responses", 2)
            await asyncio.sleep(0.1)
            assert slow.open == 0
            # A retired pool with no call left is forgotten at the next reload.
            await reload_with(proxy, path, base_config(tmp_path, primary.url, [],
                                                       access_log=True))
            assert [p.retired for p in proxy.pools] == [False]
    rows = await fetch(database_url, "SELECT shadow_status, shadow_error_kind FROM "
                                     "shadowproxy.pairs")
    assert [(r["shadow_status"], r["shadow_error_kind"]) for r in rows] == [(200, None)]


async def test_a_call_on_an_upstream_two_reloads_removed_is_waited_for_at_the_stop(
        tmp_path: Path, database_url: str) -> None:
    """A request whose head came before a reload that removed its shadow, and whose body
    came after another reload, still mirrors to that shadow: a stop waits for that call and
    records it, as it does for any other (the second reload made the proxy forget the
    shadow's pool, and the stop neither waited for its call nor stored the request)."""
    async with serve(model("v1")) as primary, CountingUpstream(delay=0.5) as slow:
        with_shadow = base_config(tmp_path, primary.url, [{"name": "slow", "url": slow.url}])
        async with live_proxy(tmp_path, database_url, with_shadow) as (proxy, path):
            body = b'{"features": {"a": 1}}'
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                         b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:5])
            await writer.drain()
            await asyncio.sleep(0.2)  # the head is parsed under the first configuration
            await reload_with(proxy, path, base_config(tmp_path, primary.url))
            await reload_with(proxy, path, base_config(tmp_path, primary.url, [],
                                                       access_log=True))
            writer.write(body[5:])
            status, _ = await read_response(reader)
            assert status == 200
            writer.close()
            await asyncio.sleep(0.1)
            assert slow.open == 1  # the shadow's call is in flight: stop now
    rows = await fetch(database_url, "SELECT shadow_status, shadow_error_kind FROM "
                                     "shadowproxy.pairs")
    assert [(r["shadow_status"], r["shadow_error_kind"]) for r in rows] == [(200, None)]


async def wait_closed(upstream: CountingUpstream, seconds: float) -> None:
    """Until every connection to ``upstream`` is closed, or ``seconds`` passed."""
    for _ in range(int(seconds / 0.05)):
        if upstream.open == 0:
            return
        await asyncio.sleep(0.05)


async def test_a_reload_s_limits_reach_the_pools_it_keeps(
        tmp_path: Path, database_url: str) -> None:
    """A reload that lowers limits.upstream_idle_s and limits.max_response_header_bytes
    applies them to the pool it keeps: the connection idle since before the reload expires
    on the new schedule, and a response head over the new cap is a 502."""
    async with CountingUpstream(pad=2000) as primary:
        def config(limits: dict[str, Any]) -> dict[str, Any]:
            return base_config(tmp_path, primary.url,
                               limits={"shutdown_grace_s": 2, **limits})

        async with live_proxy(tmp_path, database_url, config({"upstream_idle_s": 60})) as (
                proxy, path), aiohttp.ClientSession() as http:
            resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", json={})
            assert resp.status == 200
            await resp.read()
            (pool,) = proxy.pools
            outcome = await reload_with(proxy, path, config(
                {"upstream_idle_s": 0.2, "max_response_header_bytes": 1024}))
            assert outcome.result == "applied" and proxy.pools == [pool]
            await wait_closed(primary, 3.0)  # the sweep runs every second
            assert primary.open == 0, "the kept pool kept its idle connection for 60 s"
            resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", json={})
            assert resp.status == 502
            assert "limits.max_response_header_bytes" in await resp.text()
    assert primary.opened == 2


async def test_a_pool_a_reload_adds_has_its_idle_connections_expired(
        tmp_path: Path, database_url: str) -> None:
    """The upstream a reload introduces is swept like those of the start: its connection
    idle longer than limits.upstream_idle_s is closed without waiting for another call."""
    async with CountingUpstream() as first, CountingUpstream() as second:
        limits = {"limits": {"shutdown_grace_s": 2, "upstream_idle_s": 0.2}}
        async with live_proxy(tmp_path, database_url,
                              base_config(tmp_path, first.url, **limits)) as (proxy, path), \
                aiohttp.ClientSession() as http:
            await reload_with(proxy, path, base_config(tmp_path, second.url, **limits))
            resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", json={})
            assert resp.status == 200
            await resp.read()
            assert second.open == 1
            await wait_closed(second, 3.0)
            assert second.open == 0, "the new pool's idle connection was never expired"


async def test_enabled_false_stops_mirroring_and_keeps_the_counters(
        tmp_path: Path, database_url: str) -> None:
    """A shadow turned to enabled: false is no longer called, its counters stay in /metrics;
    enabled again, it is called again and counted on from where it was."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow:
        def config(enabled: bool) -> dict[str, Any]:
            return base_config(tmp_path, primary.url,
                               [{"name": "s", "url": shadow.url, "enabled": enabled}])

        async with live_proxy(tmp_path, database_url, config(True)) as (proxy, path), \
                aiohttp.ClientSession() as http:
            async def send(n: int) -> None:
                for _ in range(n):
                    await (await http.post(f"http://127.0.0.1:{proxy.port}/p", json={})).read()

            await send(2)
            await reload_with(proxy, path, config(False))
            await send(3)
            assert len(shadow.seen) == 2
            text = await (await http.get(f"http://127.0.0.1:{proxy.admin_port}/metrics")).text()
            ok = ("shadowproxy_shadow_requests_total",
                  (("outcome", "ok"), ("route", "r"), ("shadow", "s")))
            assert samples(text)[ok] == 2
            await reload_with(proxy, path, config(True))
            await send(1)
            await asyncio.sleep(0.1)
            text = await (await http.get(f"http://127.0.0.1:{proxy.admin_port}/metrics")).text()
            assert samples(text)[ok] == 3
            requests = ("shadowproxy_requests_total", (("code", "200"), ("route", "r")))
            assert samples(text)[requests] == 6


async def test_routes_are_added_removed_and_changed_live(
        tmp_path: Path, database_url: str) -> None:
    """A reload adds a route, changes a route's match and primary, and removes a route: the
    next requests follow it."""
    async with serve(model("a")) as a, serve(model("b")) as b, \
            aiohttp.ClientSession() as http:
        first = base_config(tmp_path, a.url)
        first["routes"].append({"name": "gone", "match": {"path_prefix": "/gone"},
                                "primary": {"url": a.url}})
        second = base_config(tmp_path, b.url)
        second["routes"][0]["match"] = {"path_prefix": "/v2", "methods": ["POST"]}
        second["routes"].append({"name": "new", "match": {"path_prefix": "/new"},
                                 "primary": {"url": a.url, "timeout_s": 3}})
        async with live_proxy(tmp_path, database_url, first) as (proxy, path):
            base = f"http://127.0.0.1:{proxy.port}"

            async def answer(url: str) -> tuple[int, Any]:
                resp = await http.post(url, json={})
                return resp.status, (await resp.json()).get("model_version")

            assert await answer(f"{base}/gone") == (200, "a")
            outcome = await reload_with(proxy, path, second)
            assert outcome.changes == ["route new: added", "route gone: removed",
                                       "route r: match changed, primary changed"]
            assert (await answer(f"{base}/gone"))[0] == 404
            assert (await answer(f"{base}/p"))[0] == 404
            assert await answer(f"{base}/v2/p") == (200, "b")
            assert await answer(f"{base}/new") == (200, "a")


async def test_an_invalid_file_changes_nothing_and_says_why(
        tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """An invalid file is rejected whole: the running version and routes stay, every problem
    is logged and answered as FILE:LINE: key.path: message (POST /-/reload: 422), and
    shadowproxy_config_reloads_total{result="rejected"} counts it."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow, \
            aiohttp.ClientSession() as http:
        good = base_config(tmp_path, primary.url, [{"name": "s", "url": shadow.url}],
                           admin_token="t0ken")
        async with live_proxy(tmp_path, database_url, good) as (proxy, path):
            version = proxy.version
            path.write_text(path.read_text().replace("name: s\n", "name: s\n    sample_rate: 7\n")
                            .replace("timeout_s: 5", "timeout_s: -1"))
            admin = f"http://127.0.0.1:{proxy.admin_port}"
            assert (await http.post(f"{admin}/-/reload")).status == 401
            with caplog.at_level(logging.ERROR, logger="shadowproxy"):
                resp = await http.post(f"{admin}/-/reload",
                                       headers={"Authorization": "Bearer t0ken"})
            assert resp.status == 422
            outcome = await resp.json()
            assert proxy.version == version
            resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", json={})
            assert resp.status == 200
            await resp.read()
            await asyncio.sleep(0.1)
            assert len(shadow.seen) == 1
            metrics = samples(await (await http.get(
                f"{admin}/metrics", headers={"Authorization": "Bearer t0ken"})).text())
    assert outcome["result"] == "rejected" and outcome["version"] == version
    lines = {line.split(":", 1)[1] for line in outcome["errors"]}
    assert any(e.startswith(f"{path}:") for e in outcome["errors"])
    assert any(".primary.timeout_s: Input should be greater than 0" in e for e in lines)
    assert any(".shadows[0].sample_rate: Input should be less than or equal to 1" in e
               for e in lines)
    logged = [r.getMessage() for r in caplog.records]
    assert all(e in logged for e in outcome["errors"])
    assert metrics[("shadowproxy_config_reloads_total", (("result", "rejected"),))] == 1
    assert metrics[("shadowproxy_config_reloads_total", (("result", "applied"),))] == 0
    assert metrics[("shadowproxy_config_info", (("version", version),))] == 1


async def test_restart_only_settings_are_kept_and_reported(
        tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A reload that changes listen and workers applies the rest, keeps those two as they
    run, logs one line for each saying it needs a restart and why, and reports them to the
    caller and in /readyz; the version names what runs."""
    async with serve(model("v1")) as primary, aiohttp.ClientSession() as http:
        config = base_config(tmp_path, primary.url)
        async with live_proxy(tmp_path, database_url, config) as (proxy, path):
            port = proxy.port
            changed = {**config, "listen": "127.0.0.1:1", "workers": 3,
                       "limits": {"shutdown_grace_s": 3}}
            with caplog.at_level(logging.WARNING, logger="shadowproxy"):
                outcome = await reload_with(proxy, path, changed)
            ready = await (await http.get(f"http://127.0.0.1:{proxy.admin_port}/readyz")).json()
            assert (await http.post(f"http://127.0.0.1:{port}/p", json={})).status == 200
            assert proxy.settings.listen == "127.0.0.1:0" and proxy.settings.workers == 1
            assert proxy.settings.limits.shutdown_grace_s == 3
    assert outcome.result == "applied"
    assert [line.split(":")[0] for line in outcome.restart_needed] == ["listen", "workers"]
    assert all("kept as it runs until a restart (" in line for line in outcome.restart_needed)
    assert ready["restart_needed"] == outcome.restart_needed
    assert ready["config_version"] == outcome.version == config_version(proxy.settings)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("needs" in w or "until a restart" in w for w in warned) == 2


async def test_max_in_flight_holds_across_a_reload(tmp_path: Path, database_url: str) -> None:
    """Calls in flight under the old configuration count against max_in_flight under the
    new one: a reload never lets more calls through to a shadow."""
    async with serve(model("v1")) as primary, serve(hanging()) as stuck, \
            aiohttp.ClientSession() as http:
        def config(rate: float) -> dict[str, Any]:
            return base_config(tmp_path, primary.url, [
                {"name": "stuck", "url": stuck.url, "max_in_flight": 2, "timeout_s": 5,
                 "sample_rate": rate}])

        async with live_proxy(tmp_path, database_url, config(1.0)) as (proxy, path):
            async def send(n: int) -> None:
                for _ in range(n):
                    await (await http.post(f"http://127.0.0.1:{proxy.port}/p", json={})).read()

            await send(2)
            await reload_with(proxy, path, config(0.999999))
            await send(3)
            await asyncio.sleep(0.2)
            assert len(stuck.seen) == 2
            snap = proxy.metrics.snapshot()["shadow"]
    assert snap[0][2]["dropped"] == 3


async def test_a_lowered_grace_bounds_the_stop_s_wait_for_the_database(
        tmp_path: Path, database_url: str) -> None:
    """limits.shutdown_grace_s lowered by a reload bounds the stop's wait for a slow database
    as well as its wait for requests: what the database has not taken by then is spooled,
    nothing is lost, and the stop takes about twice the new grace, as a supervisor's kill
    timeout (which follows the reload) expects, not the grace the proxy started with."""
    # A slow database: every batch's statement takes a second.
    await execute(database_url, """
        CREATE FUNCTION public.slow_batch() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$;
        CREATE TRIGGER slow_batch AFTER INSERT ON shadowproxy.requests
            FOR EACH STATEMENT EXECUTE FUNCTION public.slow_batch();""")
    sent = 40
    async with serve(model("v1")) as primary, aiohttp.ClientSession() as http:
        config = base_config(tmp_path, primary.url, limits={"shutdown_grace_s": 60},
                             recording={"flush_interval_ms": 50, "batch_max_records": 5,
                                        "write_after_records": 5})
        async with live_proxy(tmp_path, database_url, config) as (proxy, path):
            outcome = await reload_with(proxy, path, {**config,
                                                      "limits": {"shutdown_grace_s": 0.5}})
            assert outcome.result == "applied"
            for i in range(sent):
                resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", json={"i": i})
                assert resp.status == 200
            stop_began = asyncio.get_running_loop().time()
        took = asyncio.get_running_loop().time() - stop_began
    records = proxy.metrics.records
    assert records["dropped"] == 0
    assert records["written"] + records["spooled"] == sent
    assert records["spooled"] > 0, "the database took every batch: not slow enough to tell"
    # Two graces of 0.5 s, a batch on its way (1 s) and the spool's write; the queue at
    # the grace it started with would take about 7 s (35 records in batches of 5).
    assert took < 4.0, f"the stop took {took:.1f} s"


async def test_a_reload_that_changes_storage_runs_the_maintenance_at_once(
        tmp_path: Path, database_url: str) -> None:
    """A reload that sets storage.retention (or shortens maintenance_interval_s) applies it
    at once, not when the interval the proxy started with has passed (an hour here)."""
    import asyncpg

    from tests.store.test_maintenance import _old_partitions

    conn = await asyncpg.connect(database_url)
    try:
        await _old_partitions(conn, 5)
        async with serve(model("v1")) as primary:
            hourly = base_config(tmp_path, primary.url,
                                 storage={"maintenance_interval_s": 3600})
            async with live_proxy(tmp_path, database_url, hourly) as (proxy, path):
                assert proxy.maintenance is not None
                for _ in range(200):
                    if proxy.maintenance.runs:
                        break
                    await asyncio.sleep(0.05)
                assert proxy.maintenance.runs == 1
                outcome = await reload_with(proxy, path, base_config(
                    tmp_path, primary.url,
                    storage={"maintenance_interval_s": 3600, "retention": "2d"}))
                assert outcome.result == "applied"
                for _ in range(200):
                    if proxy.maintenance.runs > 1:
                        break
                    await asyncio.sleep(0.05)
                assert proxy.maintenance.runs == 2
        oldest = await conn.fetchval("SELECT min(received_at) FROM shadowproxy.requests")
        now = await conn.fetchval("SELECT now()")
    finally:
        await conn.close()
    assert oldest >= now - timedelta(days=3)


async def test_watch_reloads_edits_and_can_be_turned_on_by_a_reload(
        tmp_path: Path, database_url: str) -> None:
    """With watch: true the file is reloaded when edited in place; a reload that turns
    watch on starts watching, one that turns it off stops."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow:
        def config(rate: float, watch: bool) -> dict[str, Any]:
            return base_config(tmp_path, primary.url,
                               [{"name": "s", "url": shadow.url, "sample_rate": rate}],
                               watch=watch, watch_interval_s=0.05)

        async def wait_version(proxy: Proxy, version: str) -> None:
            for _ in range(100):
                if proxy.version == version:
                    return
                await asyncio.sleep(0.02)
            raise AssertionError(f"version {version} never ran")

        async with live_proxy(tmp_path, database_url, config(1.0, False)) as (proxy, path):
            write(path, config(0.5, False))
            await asyncio.sleep(0.3)
            assert proxy.settings.routes[0].shadows[0].sample_rate == 1.0  # not watched
            await proxy.reload("test")
            write(path, config(0.5, True))
            await proxy.reload("test")
            with path.open("r+") as f:  # in place, as on a bind mount
                f.write(yaml.safe_dump(config(0.25, True)))
                f.truncate()
            await wait_version(proxy, config_version(load_config(path)))
            write(path, config(0.25, False))
            await wait_version(proxy, config_version(load_config(path)))
            write(path, config(0.1, False))
            await asyncio.sleep(0.3)
            assert proxy.settings.routes[0].shadows[0].sample_rate == 0.25


async def test_a_value_yaml_cannot_read_is_rejected_and_watching_goes_on(
        tmp_path: Path, database_url: str) -> None:
    """A file with a tag YAML does not know (`!ENV`) or a date that is none is rejected like
    any invalid file, by every trigger (POST /-/reload: 422 with the problem at its line,
    counted as rejected); the watcher lives on and applies the next valid edit."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow, \
            aiohttp.ClientSession() as http:
        def config(rate: float) -> dict[str, Any]:
            return base_config(tmp_path, primary.url,
                               [{"name": "s", "url": shadow.url, "sample_rate": rate}],
                               watch=True, watch_interval_s=0.05)

        async with live_proxy(tmp_path, database_url, config(1.0)) as (proxy, path):
            version = proxy.version
            admin = f"http://127.0.0.1:{proxy.admin_port}"
            for bad in ("sample_rate: !ENV RATE", "sample_rate: 2026-02-30"):
                path.write_text(yaml.safe_dump(config(1.0)).replace("sample_rate: 1.0", bad))
                resp = await http.post(f"{admin}/-/reload")
                assert resp.status == 422
                outcome = await resp.json()
                assert outcome["version"] == version
                assert any(".shadows[0].sample_rate: " in e for e in outcome["errors"])
                await asyncio.sleep(0.3)  # the watcher sees the same file
            assert proxy.version == version
            write(path, config(0.5))
            for _ in range(100):
                if proxy.version != version:
                    break
                await asyncio.sleep(0.02)
            assert proxy.settings.routes[0].shadows[0].sample_rate == 0.5
            metrics = samples(await (await http.get(f"{admin}/metrics")).text())
    assert metrics[("shadowproxy_config_reloads_total", (("result", "rejected"),))] >= 2


async def test_the_access_log_names_each_request_s_config_version(
        tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Each access-log line carries the version its request was served under, before and
    after a reload (as a field for JSON logs, and in the text)."""
    async with serve(model("v1")) as primary, aiohttp.ClientSession() as http:
        config = base_config(tmp_path, primary.url, access_log=True)
        async with live_proxy(tmp_path, database_url, config) as (proxy, path):
            first = proxy.version
            with caplog.at_level(logging.INFO, logger="shadowproxy.access"):
                await (await http.post(f"http://127.0.0.1:{proxy.port}/p", json={})).read()
                await wait_for_rows(database_url, "requests", 1)
                second = (await reload_with(proxy, path, {**config, "routes": [
                    {**config["routes"][0], "preserve_host": True}]})).version
                await (await http.post(f"http://127.0.0.1:{proxy.port}/p", json={})).read()
                await wait_for_rows(database_url, "requests", 2)
    lines = [r for r in caplog.records if r.name == "shadowproxy.access"]
    assert [getattr(r, "config_version", None) for r in lines] == [first, second]
    assert f" route=r config={second} " in lines[1].getMessage()


async def test_a_reload_after_the_stop_began_changes_nothing(
        tmp_path: Path, database_url: str) -> None:
    """A reload that comes once the proxy is stopping (a SIGHUP after SIGTERM) is ignored:
    the draining proxy keeps its configuration and no watcher starts again."""
    async with serve(model("v1")) as primary:
        config = base_config(tmp_path, primary.url)
        async with live_proxy(tmp_path, database_url, config) as (proxy, path):
            version = proxy.version
            assert proxy.reloader is not None
            await proxy.reloader.close()
            outcome = await reload_with(proxy, path, {**config, "watch": True,
                                                      "access_log": True})
            assert outcome.result == "unchanged" and proxy.version == version
            assert proxy.reloader._watch_task is None


async def test_a_stream_that_outlives_many_reloads_keeps_its_recording_rules(
        tmp_path: Path, database_url: str) -> None:
    """An exchange in flight (a long stream) across more reloads than any number of kept
    versions (a sample_rate ramp) is stored under the rules it arrived under: the secret
    the old rules redact stays redacted after the new ones stopped redacting it."""
    release = asyncio.Event()

    async def streaming(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"token": "a"}\n\n')
        await release.wait()
        await response.write(b'data: {"token": "b"}\n\n')
        await response.write_eof()
        return response

    async with serve(streaming) as primary, serve(model("s")) as shadow:
        def config(rate: float, redact: list[str]) -> dict[str, Any]:
            return base_config(tmp_path, primary.url,
                               [{"name": "s", "url": shadow.url, "sample_rate": rate}],
                               recording={"flush_interval_ms": 50, "redact_json": redact,
                                          "redact_headers": ["x-secret"] if redact else []})

        async with live_proxy(tmp_path, database_url, config(1.0, ["$.secret"])) as (
                proxy, path):
            old_version = proxy.version
            body = json.dumps({"features": {"a": 1}, "secret": "s3cret"}).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nX-Request-Id: long\r\n"
                         b"X-Secret: hush\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
            await asyncio.wait_for(reader.readuntil(b'"a"}\n\n'), 5)  # the stream runs
            for step in range(20):  # a ramp: more reloads than versions were ever kept
                outcome = await reload_with(proxy, path, config(0.95 - step * 0.04, []))
                assert outcome.result == "applied"
            release.set()
            await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
            writer.close()
            await wait_for_rows(database_url, "responses", 2)
            await proxy.recorder.drained()
    rows = await fetch(database_url, "SELECT config_version, body_json->>'secret' AS secret, "
                       "headers->>'x-secret' AS header FROM shadowproxy.requests")
    assert len(rows) == 1
    assert rows[0]["config_version"] == old_version
    assert rows[0]["secret"] == "[redacted]"
    assert rows[0]["header"] == "[redacted]"
