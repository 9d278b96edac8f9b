"""Shadow calls: they never touch the client's response, and every outcome is recorded."""

from __future__ import annotations

import asyncio
import json
import os
import time

import aiohttp
from aiohttp import web

from tests.conftest import StartProxy, route
from tests.db import fetch
from tests.proxy.test_data_path import read_response, wait_for_rows
from tests.upstreams import hanging, model, serve, sleeping, unaccepting_listener


async def test_response_arrives_while_shadow_still_hangs(
        start_proxy: StartProxy, database_url: str) -> None:
    """The client has its answer while the shadow has not answered; the timeout is recorded."""
    shadow_got_it = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        shadow_got_it.set()
        await asyncio.sleep(3600)
        return web.Response()

    async with serve(model("v1")) as primary, serve(hang) as shadow, \
            start_proxy([{"name": "r", "primary": {"url": primary.url},
                          "shadows": [{"name": "stuck", "url": shadow.url,
                                       "timeout_s": 1.0}]}]) as proxy, \
            aiohttp.ClientSession() as http:
        started = time.monotonic()
        resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", json={"features": {"a": 1}})
        assert resp.status == 200
        await resp.read()
        elapsed = time.monotonic() - started
        await asyncio.wait_for(shadow_got_it.wait(), 5)
        # The shadow holds its request and the client is already served.
        assert elapsed < 1.0
        await wait_for_rows(database_url, "responses", 2)
    rows = await fetch(database_url, "SELECT shadow_status, shadow_error, primary_status "
                                         "FROM shadowproxy.pairs")
    assert [(r["shadow_status"], r["shadow_error"], r["primary_status"]) for r in rows] == [
        (None, "timeout", 200)]


async def test_slow_shadow_does_not_slow_a_keep_alive_client(start_proxy: StartProxy) -> None:
    """Requests on one connection are not held back by a shadow slower than the primary."""
    async with serve(model("v1")) as primary, serve(sleeping(0.5)) as shadow, \
            start_proxy([route(primary.url, shadow.url)]) as proxy, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        started = time.monotonic()
        for _ in range(5):
            resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", json={"features": {}})
            await resp.read()
        # nginx's mirror would take 5 × 0.5 s here.
        assert time.monotonic() - started < 0.5


async def test_dead_shadow_is_recorded_as_connect_error(
        start_proxy: StartProxy, database_url: str) -> None:
    """A shadow that refuses connections is a record with a 'connect:' error."""
    async with serve(model("gone")) as gone:
        dead = gone.url
    async with serve(model("v1")) as primary, start_proxy([route(primary.url, dead)]) as proxy, \
            aiohttp.ClientSession() as http:
        resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", json={"features": {}})
        assert resp.status == 200
        await wait_for_rows(database_url, "responses", 2)
    rows = await fetch(database_url, "SELECT shadow_error FROM shadowproxy.pairs")
    assert rows[0]["shadow_error"].startswith("connect:")


async def test_set_and_remove_headers_apply_to_the_shadow_only(start_proxy: StartProxy) -> None:
    """A shadow gets its set_headers and loses its remove_headers; the primary is untouched."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow, \
            start_proxy([{"name": "r", "primary": {"url": primary.url},
                          "shadows": [{"name": "c", "url": shadow.url,
                                       "set_headers": {"X-Shadow-Request": "1",
                                                       "X-Tenant": "shadow"},
                                       "remove_headers": ["Authorization"]}]}]) as proxy, \
            aiohttp.ClientSession() as http:
        await (await http.post(f"http://127.0.0.1:{proxy.port}/p", json={},
                               headers={"Authorization": "Bearer s3cret",
                                        "X-Tenant": "real"})).read()
        for _ in range(50):
            if shadow.seen:
                break
            await asyncio.sleep(0.02)
    p, s = primary.seen[0].headers, shadow.seen[0].headers
    assert p["authorization"] == "Bearer s3cret" and p["x-tenant"] == "real"
    assert "x-shadow-request" not in p
    assert "authorization" not in s
    assert s["x-shadow-request"] == "1" and s["x-tenant"] == "shadow"


async def test_remove_headers_keeps_the_forwarding_headers_from_that_shadow_only(
        start_proxy: StartProxy) -> None:
    """X-Forwarded-*, X-Request-Id are written by the proxy for every upstream: a shadow
    whose remove_headers names them (a candidate hosted by a third party, kept from the
    client's address) receives none of them, the client's own X-Forwarded-For neither, and
    its Content-Length still follows its set_json body. They were sent all the same. The
    primary and another shadow of the route get them as before."""
    async with serve(model("v1")) as primary, serve(model("v2")) as third, \
            serve(model("v3")) as own, \
            start_proxy([{"name": "r", "primary": {"url": primary.url},
                          "shadows": [{"name": "third", "url": third.url,
                                       "remove_headers": ["x-forwarded-for", "X-Forwarded-Host",
                                                          "X-Request-Id"],
                                       "set_json": {"model": "candidate"}},
                                      {"name": "own", "url": own.url}]}]) as proxy, \
            aiohttp.ClientSession() as http:
        await (await http.post(f"http://127.0.0.1:{proxy.port}/p", json={"a": 1},
                               headers={"X-Forwarded-For": "203.0.113.7",
                                        "X-Request-Id": "req-1"})).read()
        for _ in range(50):
            if third.seen and own.seen:
                break
            await asyncio.sleep(0.02)
    p, t, o = primary.seen[0], third.seen[0], own.seen[0]
    for seen in (p, o):
        assert seen.headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
        assert seen.headers["x-request-id"] == "req-1"
        assert "x-forwarded-host" in seen.headers
    assert not {"x-forwarded-for", "x-forwarded-host", "x-request-id"} & set(t.headers)
    assert t.headers["x-forwarded-proto"] == "http"
    assert json.loads(t.body) == {"a": 1, "model": "candidate"}
    assert t.headers["content-length"] == str(len(t.body))


async def test_a_shadow_with_its_own_headers_gets_no_header_connection_names(
        start_proxy: StartProxy) -> None:
    """The headers the client's Connection names are hop-by-hop (RFC 9110 §7.6.1): no
    upstream gets them, a shadow with set_headers or remove_headers neither. That shadow's
    header lines are made apart from the primary's, and they kept them."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow, \
            start_proxy([{"name": "r", "primary": {"url": primary.url},
                          "shadows": [{"name": "c", "url": shadow.url,
                                       "set_headers": {"X-Shadow-Request": "1"},
                                       "remove_headers": ["Authorization"]}]}]) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Hop\r\n"
                     b"X-Hop: secret\r\nX-End: kept\r\nContent-Length: 2\r\n\r\n{}")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        writer.close()
        for _ in range(50):
            if shadow.seen:
                break
            await asyncio.sleep(0.02)
    p, s = primary.seen[0].headers, shadow.seen[0].headers
    assert "x-hop" not in p and p["x-end"] == "kept"
    assert "x-hop" not in s and s["x-end"] == "kept" and s["x-shadow-request"] == "1"


async def test_sample_rate_zero_sends_nothing_and_records_no_pair(
        start_proxy: StartProxy, database_url: str) -> None:
    """A shadow sampled at 0 gets no request, and the request has no pair row."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow, \
            start_proxy([{"name": "r", "primary": {"url": primary.url},
                          "shadows": [{"name": "c", "url": shadow.url,
                                       "sample_rate": 0.0}]}]) as proxy, \
            aiohttp.ClientSession() as http:
        for _ in range(10):
            await (await http.post(f"http://127.0.0.1:{proxy.port}/p", json={})).read()
        await wait_for_rows(database_url, "requests", 10)
    assert shadow.seen == []
    assert await fetch(database_url, "SELECT * FROM shadowproxy.pairs") == []


async def test_sticky_sampling_keeps_each_user_in_or_out(start_proxy: StartProxy) -> None:
    """With sample_key, one user's requests are all mirrored or none are, near the rate."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow, \
            start_proxy([{"name": "r", "primary": {"url": primary.url},
                          "shadows": [{"name": "c", "url": shadow.url, "sample_rate": 0.5,
                                       "sample_key": "header:X-User-Id"}]}]) as proxy, \
            aiohttp.ClientSession() as http:
        for user in range(40):
            for _ in range(3):
                await (await http.post(f"http://127.0.0.1:{proxy.port}/p", json={},
                                       headers={"X-User-Id": f"user-{user}"})).read()
        await asyncio.sleep(0.2)
    per_user: dict[str, int] = {}
    for seen in shadow.seen:
        per_user[seen.headers["x-user-id"]] = per_user.get(seen.headers["x-user-id"], 0) + 1
    assert set(per_user.values()) == {3}
    assert 8 <= len(per_user) <= 32


async def test_sticky_sampling_reads_the_key_without_white_space_at_its_end(
        start_proxy: StartProxy) -> None:
    """`X-User-Id: u `, with a space or a tab before the line's end (no part of the value,
    RFC 9110 §5.5), is the same user as `X-User-Id: u`: all three in, or all three out."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow, \
            start_proxy([{"name": "r", "primary": {"url": primary.url},
                          "shadows": [{"name": "c", "url": shadow.url, "sample_rate": 0.5,
                                       "sample_key": "header:X-User-Id"}]}]) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            for user in range(40):
                for end in (b"", b" ", b"\t"):
                    writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nX-User-Id: user-%d%s\r\n"
                                 b"Content-Length: 2\r\n\r\n{}" % (user, end))
                    head, _ = await asyncio.wait_for(read_response(reader), 5)
                    assert head.startswith(b"HTTP/1.1 200"), head
        finally:
            writer.close()
        await asyncio.sleep(0.2)
    per_user: dict[str, int] = {}
    for seen in shadow.seen:
        per_user[seen.headers["x-user-id"]] = per_user.get(seen.headers["x-user-id"], 0) + 1
    assert set(per_user.values()) == {3}, per_user
    assert 8 <= len(per_user) <= 32


async def test_body_over_mirror_limit_goes_to_primary_only(
        start_proxy: StartProxy, database_url: str) -> None:
    """A body over max_mirror_body_bytes streams to the primary; the shadow is 'skipped'."""
    received: list[int] = []

    async def size(request: web.Request) -> web.StreamResponse:
        received.append(len(await request.read()))
        return web.json_response({"size": received[-1]})

    big = b"x" * 300_000
    async with serve(size) as primary, serve(size) as shadow, \
            start_proxy([route(primary.url, shadow.url)],
                        limits={"max_mirror_body_bytes": 100_000},
                        recording={"max_body_bytes": 1000}) as proxy, \
            aiohttp.ClientSession() as http:
        resp = await http.post(f"http://127.0.0.1:{proxy.port}/upload", data=big)
        assert (await resp.json()) == {"size": 300_000}

        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(30):
                yield b"y" * 10_000

        resp = await http.post(f"http://127.0.0.1:{proxy.port}/upload", data=chunks())
        assert (await resp.json()) == {"size": 300_000}
        await wait_for_rows(database_url, "responses", 4)
    assert received == [300_000, 300_000]  # the shadow got neither
    rows = await fetch(database_url, "SELECT shadow_error FROM shadowproxy.pairs")
    assert [r["shadow_error"] for r in rows] == ["skipped: body_too_large"] * 2
    reqs = await fetch(database_url, "SELECT body_size, body_truncated, length(body) AS n "
                                         "FROM shadowproxy.requests")
    assert {(r["body_size"], r["body_truncated"], r["n"]) for r in reqs} == {(300_000, True, 1000)}


async def test_shadow_over_max_in_flight_is_dropped_not_queued(
        start_proxy: StartProxy, database_url: str) -> None:
    """Over max_in_flight, shadow calls are dropped at once and recorded as overload."""
    async with serve(model("v1")) as primary, serve(hanging()) as shadow, \
            start_proxy([{"name": "r", "primary": {"url": primary.url},
                          "shadows": [{"name": "c", "url": shadow.url, "timeout_s": 1,
                                       "max_in_flight": 2}]}]) as proxy, \
            aiohttp.ClientSession() as http:
        for _ in range(5):
            await (await http.post(f"http://127.0.0.1:{proxy.port}/p", json={})).read()
        await wait_for_rows(database_url, "responses", 10)
    rows = await fetch(database_url, "SELECT shadow_error, count(*) AS n "
                                         "FROM shadowproxy.pairs GROUP BY 1 ORDER BY 1")
    assert [(r["shadow_error"], r["n"]) for r in rows] == [("dropped: overload", 3),
                                                          ("timeout", 2)]


async def test_two_shadows_each_get_a_row(start_proxy: StartProxy, database_url: str) -> None:
    """Every shadow of a route is called and paired with the primary."""
    async with serve(model("v1")) as primary, serve(model("v2", 2)) as s1, \
            serve(model("v3", 3)) as s2, \
            start_proxy([route(primary.url, s1.url, s2.url)]) as proxy, \
            aiohttp.ClientSession() as http:
        await (await http.post(f"http://127.0.0.1:{proxy.port}/p",
                               json={"features": {"a": 1}})).read()
        await wait_for_rows(database_url, "responses", 3)
    rows = await fetch(database_url, "SELECT shadow_name, shadow_body_json "
                                         "FROM shadowproxy.pairs ORDER BY shadow_name")
    assert [(r["shadow_name"], json.loads(r["shadow_body_json"])["prediction"])
            for r in rows] == [("s1", 2.0), ("s2", 3.0)]


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_shadow_that_drops_connection_attempts_leaves_no_sockets_behind(
        start_proxy: StartProxy, database_url: str) -> None:
    """A shadow whose host drops connection attempts: each timed-out attempt is cancelled
    and its socket closed, and attempts still connecting count against max_in_flight, so
    open descriptors stay within max_in_flight of where they were."""
    with unaccepting_listener() as dead:
        async with serve(model("v1")) as primary, \
                start_proxy([{"name": "r", "primary": {"url": primary.url},
                              "shadows": [{"name": "dead", "url": dead, "timeout_s": 0.2,
                                           "max_in_flight": 4}]}]) as proxy, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
            url = f"http://127.0.0.1:{proxy.port}/p"
            await (await http.post(url, json={})).read()
            await asyncio.sleep(0.3)
            baseline = open_descriptors()
            peak = baseline
            for _ in range(60):  # 1.5 s: about 7 timeouts of 4 attempts each
                await (await http.post(url, json={})).read()
                peak = max(peak, open_descriptors())
                await asyncio.sleep(0.025)
            await asyncio.sleep(0.4)
            after = open_descriptors()
            await wait_for_rows(database_url, "responses", 122)
    assert peak - baseline <= 4 + 2, (baseline, peak)
    assert after - baseline <= 2, (baseline, after)
    rows = await fetch(database_url, "SELECT shadow_error, count(*) AS n "
                                     "FROM shadowproxy.pairs GROUP BY 1")
    outcomes = {r["shadow_error"]: r["n"] for r in rows}
    assert set(outcomes) == {"timeout", "dropped: overload"}, outcomes
    assert outcomes["timeout"] >= 16
