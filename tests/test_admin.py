"""The admin listener: health, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from shadowproxy.app import running
from shadowproxy.config import Settings
from tests.conftest import StartProxy, route
from tests.upstreams import hanging, model, serve


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_health_ready_and_metrics(start_proxy: StartProxy) -> None:
    """/healthz and /readyz answer 200, and /metrics counts requests, shadows and records."""
    async with serve(model("v1")) as primary, serve(hanging()) as stuck, \
            start_proxy([{"name": "r", "primary": {"url": primary.url},
                          "shadows": [{"name": "slow", "url": stuck.url, "timeout_s": 0.2}]}]
                        ) as proxy, aiohttp.ClientSession() as http:
        admin = f"http://127.0.0.1:{proxy.admin_port}"
        assert (await http.get(f"{admin}/healthz")).status == 200
        ready = await http.get(f"{admin}/readyz")
        assert ready.status == 200 and (await ready.json())["database"] == "ok"
        for _ in range(3):
            await (await http.post(f"http://127.0.0.1:{proxy.port}/p", json={})).read()
        await (await http.get(f"http://127.0.0.1:{proxy.port}/p?status=500")).read()
        await asyncio.sleep(0.5)  # shadow timeouts, then a flush
        await proxy.recorder.drained()
        text = await (await http.get(f"{admin}/metrics")).text()
    m = samples(text)
    assert m[("shadowproxy_requests_total", (("code", "200"), ("route", "r")))] == 3
    assert m[("shadowproxy_requests_total", (("code", "500"), ("route", "r")))] == 1
    assert m[("shadowproxy_shadow_requests_total",
              (("outcome", "timeout"), ("route", "r"), ("shadow", "slow")))] == 4
    assert m[("shadowproxy_records_total", (("outcome", "written"),))] == 4
    assert m[("shadowproxy_upstream_latency_seconds_count",
              (("route", "r"), ("target", "primary")))] == 4
    assert ("shadowproxy_recorder_queue_records", ()) in m


async def test_admin_token_protects_data_and_leaves_probes_open(
        start_proxy: StartProxy) -> None:
    """With admin_token, /healthz and /readyz answer probes without it (status only), while
    /metrics and the readiness details need it; a 401 carries WWW-Authenticate: Bearer."""
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url)], admin_token="t0ken") as proxy, \
            aiohttp.ClientSession() as http:
        admin = f"http://127.0.0.1:{proxy.admin_port}"
        good = {"Authorization": "Bearer t0ken"}
        health = await http.get(f"{admin}/healthz")
        assert health.status == 200 and await health.json() == {"status": "ok"}
        ready = await http.get(f"{admin}/readyz")
        assert ready.status == 200 and await ready.json() == {"status": "ready"}
        ready = await http.get(f"{admin}/readyz", headers=good)
        assert ready.status == 200 and (await ready.json())["database"] == "ok"

        missing = await http.get(f"{admin}/metrics")
        assert missing.status == 401
        assert missing.headers["WWW-Authenticate"] == 'Bearer realm="shadowproxy admin"'
        wrong = await http.get(f"{admin}/metrics", headers={"Authorization": "Bearer wrong"})
        assert wrong.status == 401
        assert wrong.headers["WWW-Authenticate"] == \
            'Bearer realm="shadowproxy admin", error="invalid_token"'
        ok = await http.get(f"{admin}/metrics", headers=good)
        assert ok.status == 200 and "shadowproxy_requests_total" in await ok.text()


async def test_an_authorization_header_that_is_not_utf8_is_a_wrong_token(
        start_proxy: StartProxy, caplog: pytest.LogCaptureFixture) -> None:
    """`Authorization: Bearer \\xff` (bytes that are not UTF-8) gets the 401 of a wrong token,
    with nothing logged; the right token still works on the same listener."""
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url)], admin_token="t0ken") as proxy:
        for path in (b"/metrics", b"/readyz"):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.admin_port)
            writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n"
                         b"Authorization: Bearer t0k\xffen\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            status = answer.split(b"\r\n", 1)[0]
            if path == b"/metrics":
                assert status == b"HTTP/1.1 401 Unauthorized", answer[:200]
                assert b'error="invalid_token"' in answer
            else:  # a probe: open, without the details
                assert status == b"HTTP/1.1 200 OK", answer[:200]
                assert answer.endswith(b'{"status": "ready"}'), answer[-200:]
        async with aiohttp.ClientSession() as http:
            ok = await http.get(f"http://127.0.0.1:{proxy.admin_port}/metrics",
                                headers={"Authorization": "Bearer t0ken"})
            assert ok.status == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_the_bearer_scheme_is_case_insensitive(start_proxy: StartProxy) -> None:
    """`bearer t0ken`, `BEARER t0ken` and `Bearer  t0ken` carry the token (RFC 9110 §11.1:
    the scheme is case-insensitive; RFC 6750 §2.1: one or more spaces before it); another
    scheme, another token or no space between them does not."""
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url)], admin_token="t0ken") as proxy, \
            aiohttp.ClientSession() as http:
        metrics = f"http://127.0.0.1:{proxy.admin_port}/metrics"
        for given, status in [("bearer t0ken", 200), ("BEARER t0ken", 200),
                              ("Bearer  t0ken", 200), ("Basic t0ken", 401),
                              ("Bearer t0ke", 401), ("Bearer t0ken2", 401),
                              ("Bearert0ken", 401), ("t0ken", 401), ("Bearer ", 401)]:
            answer = await http.get(metrics, headers={"Authorization": given})
            assert answer.status == status, given


async def test_a_wrong_path_or_method_is_answered_in_json_saying_what_is_served(
        start_proxy: StartProxy) -> None:
    """No such endpoint (404) and a wrong method (405, with Allow) are JSON like the
    listener's other answers, naming what it serves and which method to use."""
    async with serve(model("v1")) as primary, start_proxy([route(primary.url)]) as proxy, \
            aiohttp.ClientSession() as http:
        admin = f"http://127.0.0.1:{proxy.admin_port}"
        missing = await http.get(f"{admin}/-/relaod")
        wrong = await http.post(f"{admin}/metrics")
        assert missing.status == 404
        assert (await missing.json())["error"] == (
            "no admin endpoint at /-/relaod; this listener serves GET /healthz, GET /readyz, "
            "GET /metrics")
        assert wrong.status == 405 and wrong.headers["Allow"] == "GET,HEAD"
        assert (await wrong.json())["error"] == "/metrics does not take POST: use GET"


async def test_a_rejected_database_url_is_not_repeated_with_its_password(
        tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A reload of a file whose database.url has a mistyped scheme is rejected, saying
    which scheme was wrong, without the URL: its password was in the 422 answer of
    POST /-/reload and in the error logged."""
    async with serve(model("v1")) as primary:
        config = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
                  "data_dir": str(tmp_path / "data"), "database": {"url": database_url},
                  "routes": [route(primary.url)]}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        settings = Settings.model_validate(config)
        async with running(settings, database_url, config_path=path) as proxy, \
                aiohttp.ClientSession() as http:
            config["database"] = {"url": "postgresq://sp:s3cr3t-pw@db.example:5432/sp"}
            path.write_text(yaml.safe_dump(config))
            answer = await http.post(f"http://127.0.0.1:{proxy.admin_port}/-/reload")
            body = await answer.text()
    assert answer.status == 422
    assert "database.url: expected a postgresql:// URL, got the scheme 'postgresq'" in body
    assert "s3cr3t-pw" not in body
    assert "s3cr3t-pw" not in caplog.text
    assert "got the scheme 'postgresq'" in caplog.text
