"""Structured logs: one JSON object per line, the request id on every line about a request."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from shadowproxy.logs import JsonFormatter, TextFormatter, Throttle, setup_logging
from tests.conftest import StartProxy, route
from tests.test_run_command import free_port, wait_ready, write_config
from tests.upstreams import closing, hanging, model, raw_server, serve


@pytest.mark.parametrize("log_format", ["json", "text"])
async def test_access_log_carries_each_exchange_in_either_format(
        tmp_path: Path, database_url: str, log_format: str) -> None:
    """With access_log, `shadowproxy run --log-format json|text` writes one line per request
    with its X-Request-Id, method, path with the query redacted, route, the client's status,
    duration, bytes in and out, and every call's status and latency; JSON lines parse."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow:
        config, port, admin = write_config(tmp_path, primary.url, shadow.url, database_url,
                                           access_log=True)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shadowproxy", "run", "-c", str(config), "--log-format",
            log_format, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "SHADOWPROXY_DATABASE_URL": ""})
        await wait_ready(admin, proc)
        ids = []
        async with aiohttp.ClientSession() as http:
            for i in range(3):
                resp = await http.post(f"http://127.0.0.1:{port}/p?i={i}&token=SECRET{i}",
                                       json={"features": {"a": i}})
                ids.append(resp.headers["X-Request-Id"])
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.stderr is not None
        err = await asyncio.wait_for(proc.stderr.read(), 20)
        assert await proc.wait() == 0
    assert "SECRET" not in err.decode()
    lines = [line for line in err.decode().splitlines() if line.strip()]
    if log_format == "json":
        events = [json.loads(line) for line in lines]
        access = [e for e in events if e["logger"] == "shadowproxy.access"]
        assert sorted(e["request_id"] for e in access) == sorted(ids)
        for event in access:
            assert event["message"].startswith("POST /p?i=")
            assert (event["route"], event["method"], event["path"]) == ("r", "POST", "/p")
            assert re.fullmatch(r"[0-9a-f]{12}", event["config_version"])
            assert event["query"].endswith("&token=[redacted]")
            assert event["status"] == 200 and event["bytes_in"] == len('{"features": {"a": 0}}')
            assert event["bytes_out"] > 0 and event["duration_ms"] > 0
            for target in ("primary", "c"):
                call = event["calls"][target]
                assert call["status"] == 200 and call["latency_ms"] > 0
                assert call["error_kind"] is None
            assert event["duration_ms"] >= event["calls"]["primary"]["latency_ms"]
        stops = [e["message"] for e in events if e["message"].startswith("stopped:")]
        assert len(stops) == 1
        assert re.fullmatch(r"stopped: served=\d+ written=\d+ spooled=0 dropped=0 "
                            r"stop_cpu_s=\d+\.\d{3}", stops[0]), stops[0]
    else:
        access = [line for line in lines if " shadowproxy.access[" in line]
        assert sorted(line.rsplit("request_id=", 1)[1] for line in access) == sorted(ids)
        for line in access:
            assert re.search(r": POST /p\?i=\d&token=\[redacted\] -> 200 route=r "
                             r"config=[0-9a-f]{12} duration_ms=[\d.]+ bytes_in=22 bytes_out=\d+ "
                             r"primary=200:[\d.]+ms c=200:[\d.]+ms request_id=\S+$", line), line


async def test_access_log_says_what_the_client_got_and_why_each_call_failed(
        start_proxy: StartProxy, caplog: pytest.LogCaptureFixture) -> None:
    """A shadow timing out, a primary that cannot be reached (502) and one that does not
    answer in time (504): each line has the client's status and every call's error kind, in
    the text and the JSON format alike."""
    caplog.set_level(logging.INFO, logger="shadowproxy.access")
    closed_port = free_port()
    async with serve(model("v1")) as primary, serve(hanging()) as stuck, \
            start_proxy([
                {"name": "r", "match": {"path_prefix": "/ok"}, "primary": {"url": primary.url},
                 "shadows": [{"name": "slow", "url": stuck.url, "timeout_s": 0.2}]},
                {"name": "down", "match": {"path_prefix": "/down"},
                 "primary": {"url": f"http://127.0.0.1:{closed_port}"}},
                {"name": "late", "match": {"path_prefix": "/late"},
                 "primary": {"url": stuck.url, "timeout_s": 0.2}},
            ], access_log=True) as proxy, aiohttp.ClientSession() as http:
        for path, status in (("/ok", 200), ("/down", 502), ("/late", 504)):
            resp = await http.get(f"http://127.0.0.1:{proxy.port}{path}",
                                  headers={"X-Request-Id": path[1:]})
            assert resp.status == status
            await resp.read()
        await asyncio.sleep(0.3)
        await proxy.recorder.drained()
    records = {r.request_id: r for r in caplog.records  # type: ignore[attr-defined]
               if r.name == "shadowproxy.access"}
    ok, down, late = records["ok"], records["down"], records["late"]
    assert ok.status == 200 and ok.calls["slow"]["error_kind"] == "timeout"
    assert ok.calls["slow"]["status"] is None and ok.calls["slow"]["latency_ms"] >= 200
    assert down.status == 502 and down.calls["primary"]["error_kind"] == "connect"
    assert down.bytes_out is None
    assert late.status == 504 and late.calls["primary"]["error_kind"] == "timeout"
    assert late.duration_ms >= 200
    text = TextFormatter("%(message)s")
    assert re.fullmatch(r"GET /ok -> 200 route=r config=[0-9a-f]{12} duration_ms=[\d.]+ "
                        r"bytes_in=0 bytes_out=\d+ primary=200:[\d.]+ms "
                        r"slow=-/timeout:[\d.]+ms request_id=ok", text.format(ok))
    assert re.fullmatch(r"GET /down -> 502 route=down config=[0-9a-f]{12} "
                        r"duration_ms=[\d.]+ bytes_in=0 bytes_out=- "
                        r"primary=-/connect:[\d.]+ms request_id=down", text.format(down))
    event = json.loads(JsonFormatter().format(late))
    assert (event["status"], event["route"], event["request_id"]) == (504, "late", "late")
    assert event["calls"]["primary"]["error_kind"] == "timeout"


async def test_access_log_says_the_primarys_status_when_its_answer_broke_off_after_the_head(
        start_proxy: StartProxy, caplog: pytest.LogCaptureFixture) -> None:
    """The primary's head goes to the client as soon as it is read; when the answer then
    breaks off before any body byte, the client has the primary's 200 and a cut
    connection. The access line says 200 with 0 bytes out, as the metric counts it, not a
    502 the client never got."""
    caplog.set_level(logging.INFO, logger="shadowproxy.access")

    async def head_then_close(reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)  # the head is relayed on its own, then the answer ends

    async with raw_server(closing(head_then_close)) as url, \
            start_proxy([route(url)], access_log=True) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /p HTTP/1.1\r\nHost: x\r\nX-Request-Id: cut\r\n\r\n")
        got = await reader.read()  # up to the cut
        writer.close()
        assert got.startswith(b"HTTP/1.1 200 OK\r\n")
        await asyncio.sleep(0.3)
        await proxy.recorder.drained()
        codes = proxy.metrics.routes["r"].codes
    [line] = [r for r in caplog.records if r.name == "shadowproxy.access"]
    assert line.request_id == "cut"  # type: ignore[attr-defined]
    assert line.status == 200 and line.bytes_out == 0  # type: ignore[attr-defined]
    assert line.calls["primary"]["error_kind"] == "closed"  # type: ignore[attr-defined]
    assert codes == {200: 1}
    assert re.match(r"GET /p -> 200 .* bytes_out=0 primary=200/closed:",
                    TextFormatter("%(message)s").format(line))


def test_text_lines_end_with_the_request_id() -> None:
    """In text logs, a line about a request ends with request_id=..."""
    record = logging.LogRecord("shadowproxy.access", logging.INFO, __file__, 1, "GET / -> 200",
                               None, None)
    record.request_id = "abc"
    assert TextFormatter("%(message)s").format(record) == "GET / -> 200 request_id=abc"
    assert json.loads(JsonFormatter().format(record))["request_id"] == "abc"


def test_a_text_line_has_the_time_of_the_json_line_whatever_the_local_zone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A text line's time is UTC with its offset, the JSON line's `time`, in a process of
    any zone: the two lines an hour apart when New York puts its clocks back read apart.
    They both read `2026-11-01 01:30:00,000`, the local time without a zone."""
    import time

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        lines = []
        for created in (1793511000.0, 1793514600.0):  # 2026-11-01 05:30 and 06:30 UTC
            record = logging.LogRecord("shadowproxy", logging.INFO, __file__, 1, "m", None,
                                       None)
            record.created = created
            text = TextFormatter("%(asctime)s %(message)s").format(record)
            assert text == f"{json.loads(JsonFormatter().format(record))['time']} m"
            lines.append(text)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert lines == ["2026-11-01T05:30:00.000+00:00 m", "2026-11-01T06:30:00.000+00:00 m"]


async def test_a_request_id_cannot_add_fields_to_a_text_line(
        start_proxy: StartProxy, caplog: pytest.LogCaptureFixture) -> None:
    """An X-Request-Id with spaces, `=` or quotes (the client chooses it) ends the text line
    JSON-quoted: the line has one request_id, the client's whole value, and no field of the
    client's making; an id without them stays bare."""
    caplog.set_level(logging.INFO, logger="shadowproxy.access")
    forged = ['mine status=200 request_id=victim', 'x"y', 'a\\b', 'k=v', 'tab\there']
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url)], access_log=True) as proxy, \
            aiohttp.ClientSession() as http:
        for request_id in [*forged, "plain-id"]:
            resp = await http.get(f"http://127.0.0.1:{proxy.port}/p",
                                  headers={"X-Request-Id": request_id})
            assert resp.status == 200 and resp.headers["X-Request-Id"] == request_id
            await resp.read()
        await asyncio.sleep(0.2)
        await proxy.recorder.drained()
    text = TextFormatter("%(message)s")
    lines = {r.request_id: text.format(r) for r in caplog.records  # type: ignore[attr-defined]
             if r.name == "shadowproxy.access"}
    assert set(lines) == {*forged, "plain-id"}
    field = re.compile(r'(?:^| )([a-z_]+)=("(?:[^"\\]|\\.)*"|\S*)')
    for request_id in forged:
        line = lines[request_id]
        fields = field.findall(line)
        assert [k for k, _ in fields].count("request_id") == 1, line
        assert "status" not in dict(fields), line
        assert json.loads(dict(fields)["request_id"]) == request_id, line
        assert "\n" not in line and "\t" not in line
    assert lines["plain-id"].endswith(" request_id=plain-id")


def test_throttle_lets_a_few_lines_through_per_period_and_counts_the_rest() -> None:
    """An event a client can cause at will is logged at most `limit` times a period; the
    next line let through says how many were held back."""
    throttle = Throttle(limit=3, period_s=60.0)
    assert [throttle.allow(now=t) for t in (0.0, 1.0, 2.0)] == [(True, 0)] * 3
    assert [throttle.allow(now=t) for t in (3.0, 4.0, 59.0)] == [(False, 0)] * 3
    assert throttle.allow(now=60.0) == (True, 3)
    assert throttle.allow(now=61.0) == (True, 0)


def test_the_benchmark_reads_the_stop_line_the_text_log_writes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/summarize.py's record check reads each run's stop line from the proxy's text
    log (its time, served=, written=, ...): a stop line it cannot read counts the run as
    killed. It reads the line as ``setup_logging``'s text format writes it, and the older
    local time without a zone, which a benchmark against an earlier build meets."""
    bench = Path(__file__).resolve().parent.parent / "bench"
    monkeypatch.syspath_prepend(str(bench))
    summarize = importlib.import_module("summarize")
    root, access = logging.getLogger(), logging.getLogger("aiohttp.access")
    monkeypatch.setattr(root, "handlers", [])  # setup_logging's changes undone after
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(access, "level", access.level)
    setup_logging("text")
    formatter = logging.getLogger().handlers[0].formatter
    assert formatter is not None
    record = logging.LogRecord("shadowproxy", logging.INFO, __file__, 1,
                               "stopped: served=%d written=%d spooled=%d dropped=%d "
                               "stop_cpu_s=%.3f", (7, 6, 1, 0, 0.25), None)
    record.created = 1796538499.367  # 2026-12-06T06:28:19.367 UTC
    older = "2026-12-06 06:28:19,367 INFO shadowproxy[1]: stopped: served=7 written=6 " \
            "spooled=1 dropped=0 stop_cpu_s=0.250"
    for line in (formatter.format(record), older):
        match = summarize._STOP.search(line)
        assert match is not None, line
        assert match.groups()[1:] == ("7", "6", "1", "0", "0.250")
    assert summarize.stop_time(summarize._STOP.search(formatter.format(record))[1]) == \
        pytest.approx(1796538499.367)
