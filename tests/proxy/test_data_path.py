"""The data path end to end: real upstreams on 127.0.0.1, a real PostgreSQL."""

from __future__ import annotations

import asyncio
import gzip
import json

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import StartProxy, route
from tests.db import fetch, fetchrow, fetchval
from tests.upstreams import model, raw_server, serve


async def wait_for_rows(url: str, table: str, n: int, timeout: float = 10.0) -> None:
    """Poll until ``table`` has ``n`` rows (the recorder flushes every 50 ms in tests)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        count = await fetchval(url, f"SELECT count(*) FROM shadowproxy.{table}")
        if count >= n or asyncio.get_running_loop().time() > deadline:
            assert count == n, f"{table}: expected {n} rows, found {count}"
            return
        await asyncio.sleep(0.05)


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of one Content-Length-framed response read from a raw connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    return head, await reader.readexactly(length)


async def test_client_gets_primary_answer_and_pair_is_recorded(
        start_proxy: StartProxy, database_url: str) -> None:
    """A POST returns the primary's answer; the request and both responses are recorded."""
    async with serve(model("v1")) as primary, serve(model("v2", scale=2.0)) as shadow, \
            start_proxy([route(primary.url, shadow.url)]) as proxy, \
            aiohttp.ClientSession() as http:
        resp = await http.post(f"http://127.0.0.1:{proxy.port}/predict?x=1",
                               json={"features": {"a": 1.5, "b": 2}})
        body = await resp.json()
        assert resp.status == 200
        assert body == {"prediction": 3.5, "model_version": "v1"}
        request_id = resp.headers["X-Request-Id"]
        await wait_for_rows(database_url, "responses", 2)

    pair = await fetchrow(database_url, "SELECT * FROM shadowproxy.pairs")
    req = await fetchrow(database_url, "SELECT * FROM shadowproxy.requests")
    assert pair["request_id"] == request_id
    assert pair["method"] == "POST" and pair["path"] == "/predict"
    assert json.loads(pair["request_body_json"]) == {"features": {"a": 1.5, "b": 2}}
    assert json.loads(pair["primary_body_json"])["prediction"] == 3.5
    assert json.loads(pair["shadow_body_json"])["prediction"] == 7.0
    assert pair["primary_status"] == pair["shadow_status"] == 200
    assert pair["shadow_name"] == "s1" and pair["shadow_error"] is None
    assert pair["primary_latency_ms"] > 0 and pair["shadow_latency_ms"] > 0
    assert req["query"] == "x=1" and req["client_addr"] == "127.0.0.1"
    assert shadow.seen[0].headers["x-request-id"] == request_id
    assert primary.seen[0].headers["x-request-id"] == request_id
    assert primary.seen[0].query == "x=1"


async def test_gzip_response_passes_through_as_bytes_and_is_stored_as_json(
        start_proxy: StartProxy, database_url: str) -> None:
    """A gzip response reaches the client byte for byte; the database gets its JSON."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow, \
            start_proxy([route(primary.url, shadow.url)]) as proxy, \
            aiohttp.ClientSession(auto_decompress=False) as http:
        resp = await http.post(f"http://127.0.0.1:{proxy.port}/p?gzip=1",
                               json={"features": {"a": 1}})
        raw = await resp.read()
        assert resp.headers["Content-Encoding"] == "gzip"
        assert json.loads(gzip.decompress(raw)) == {"prediction": 1, "model_version": "v1"}
        await wait_for_rows(database_url, "responses", 2)
    stored = await fetchval(database_url, "SELECT body_json->>'prediction' "
                                          "FROM shadowproxy.responses WHERE role='primary'")
    raw_stored = await fetchval(
        database_url, "SELECT body FROM shadowproxy.responses WHERE role='primary'")
    assert stored == "1.0"
    assert raw_stored == raw


@pytest.mark.parametrize("redact", [False, True], ids=["no rules", "redact_json"])
async def test_a_gzip_body_of_several_members_is_stored_with_all_of_its_json(
        start_proxy: StartProxy, database_url: str, redact: bool) -> None:
    """A gzip request and response made of two members (``cat a.gz b.gz``, which RFC 1952
    allows and clients decode whole) are stored with the JSON of both members; with
    redaction rules, the stored body is the whole redacted document."""
    members = gzip.compress(b'{"prediction": 1, ') + gzip.compress(b'"secret": "s1"}')

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(body=members, headers={"Content-Encoding": "gzip",
                                                   "Content-Type": "application/json"})

    recording = {"redact_json": ["$.secret"]} if redact else {}
    async with serve(answer) as primary, \
            start_proxy([route(primary.url)], recording=recording) as proxy, \
            aiohttp.ClientSession(auto_decompress=False) as http:
        resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", data=members,
                               headers={"Content-Encoding": "gzip",
                                        "Content-Type": "application/json"})
        assert resp.status == 200 and await resp.read() == members
        await wait_for_rows(database_url, "responses", 1)
    rows = await fetch(database_url, "SELECT body, body_json::text AS j FROM "
                       "shadowproxy.requests UNION ALL SELECT body, body_json::text "
                       "FROM shadowproxy.responses")
    assert len(rows) == 2
    secret = "[redacted]" if redact else "s1"
    for row in rows:
        assert row["j"] is not None and json.loads(row["j"]) == {"prediction": 1,
                                                                 "secret": secret}
        stored = row["body"] if redact else gzip.decompress(row["body"])
        assert json.loads(stored) == {"prediction": 1, "secret": secret}


async def test_unrouted_request_gets_404_json_and_is_not_recorded(
        start_proxy: StartProxy, database_url: str) -> None:
    """A path or method no route takes gets a JSON 404 and leaves no record."""
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url, match={"path_prefix": "/api",
                                                   "methods": ["POST"]})]) as proxy, \
            aiohttp.ClientSession() as http:
        resp = await http.get(f"http://127.0.0.1:{proxy.port}/other")
        assert resp.status == 404
        body = await resp.json()
        assert "no route" in body["error"] and body["status"] == 404
        # No record, so no id to look it up by (docs/reliability.md).
        assert body["request_id"] is None and "X-Request-Id" not in resp.headers
        resp = await http.get(f"http://127.0.0.1:{proxy.port}/api/x")
        assert resp.status == 404
        await asyncio.sleep(0.2)
    await wait_for_rows(database_url, "requests", 0)
    assert primary.seen == []


async def test_longest_prefix_wins(start_proxy: StartProxy) -> None:
    """The route with the longest matching path prefix takes the request."""
    async with serve(model("root")) as root, serve(model("api")) as api, \
            start_proxy([route(root.url, name="root"),
                         route(api.url, name="api", match={"path_prefix": "/api"})]) as proxy, \
            aiohttp.ClientSession() as http:
        a = await (await http.get(f"http://127.0.0.1:{proxy.port}/api/v1")).json()
        b = await (await http.get(f"http://127.0.0.1:{proxy.port}/v1")).json()
    assert a["model_version"] == "api" and b["model_version"] == "root"


async def test_a_percent_encoded_prefix_takes_either_case_of_its_hex_digits(
        start_proxy: StartProxy, database_url: str) -> None:
    """`/caf%C3%A9` takes `/caf%c3%a9/x` as curl sends it (the hex digits' case carries no
    meaning, RFC 3986 §6.2.2.1); the path goes on, and is recorded, as the client sent it.
    The request went to the shorter prefix's route."""
    async with serve(model("root")) as root, serve(model("cafe")) as cafe, \
            start_proxy([route(root.url, name="root"),
                         route(cafe.url, name="cafe", match={"path_prefix": "/caf%C3%A9"})
                         ]) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        answers = []
        for path in (b"/caf%c3%a9/x", b"/caf%C3%A9/y", b"/caf%c3%aa"):
            writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n")
            answers.append(json.loads((await read_response(reader))[1])["model_version"])
        writer.close()
        await wait_for_rows(database_url, "requests", 3)
    assert answers == ["cafe", "cafe", "root"]
    rows = await fetch(database_url, "SELECT route, path FROM shadowproxy.requests "
                                     "ORDER BY received_at")
    assert [tuple(r) for r in rows] == [("cafe", "/caf%c3%a9/x"), ("cafe", "/caf%C3%A9/y"),
                                        ("root", "/caf%c3%aa")]


async def test_headers_forwarded_rewritten_and_hop_by_hop_removed(
        start_proxy: StartProxy) -> None:
    """Upstreams get the client's headers minus hop-by-hop ones, plus X-Forwarded-*."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow, \
            start_proxy([route(primary.url, shadow.url)]) as proxy, \
            aiohttp.ClientSession() as http:
        resp = await http.post(
            f"http://127.0.0.1:{proxy.port}/p", json={"features": {}},
            headers={"X-Custom": "yes", "X-Request-Id": "abc-123", "Keep-Alive": "timeout=5",
                     "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1",
                     "Proxy-Authorization": "Basic Zm9v", "traceparent":
                     "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                     "X-Forwarded-For": "10.1.2.3"})
        assert resp.headers["X-Request-Id"] == "abc-123"
        await resp.read()
        await asyncio.sleep(0.1)
    for seen in (primary.seen[0], shadow.seen[0]):
        h = seen.headers
        assert h["x-custom"] == "yes"
        assert h["x-request-id"] == "abc-123"
        assert h["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        assert h["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
        assert h["x-forwarded-proto"] == "http"
        assert h["x-forwarded-host"] == f"127.0.0.1:{proxy.port}"
        assert "keep-alive" not in h and "x-secret-hop" not in h
        assert "proxy-authorization" not in h
    assert primary.seen[0].headers["host"] == primary.url.removeprefix("http://")
    assert shadow.seen[0].headers["host"] == shadow.url.removeprefix("http://")


async def test_headers_forwarded_without_connection_tokens(start_proxy: StartProxy) -> None:
    """Without tokens in Connection (the lines gathered while parsing): every header but
    the hop-by-hop and rewritten ones reaches the upstream as sent, repeats and order kept."""
    heads: list[bytes] = []

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        heads.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    async with raw_server(respond) as primary, start_proxy([route(primary)]) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        body = b'{"features": {}}'
        writer.write(b"POST /p HTTP/1.1\r\nHost: example\r\nX-Custom: yes\r\n"
                     b"Keep-Alive: timeout=5\r\nAccept: a\r\nPROXY-AUTHORIZATION: Basic x\r\n"
                     b"accept: b\r\nTE: trailers\r\nContent-Type: application/json\r\n"
                     b"X-Request-Id: r-1\r\nContent-Length: %d\r\n"
                     b"Connection: keep-alive\r\n\r\n" % len(body) + body)
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        writer.close()
    lines = heads[0].split(b"\r\n")[1:-2]
    client_lines = [line for line in lines
                    if not line.startswith((b"Host:", b"X-Forwarded-", b"X-Request-Id:",
                                            b"Content-Length:"))]
    assert client_lines == [b"X-Custom: yes", b"Accept: a", b"accept: b",
                            b"Content-Type: application/json"]
    assert b"X-Request-Id: r-1" in lines and b"X-Forwarded-Host: example" in lines
    assert b"Content-Length: %d" % len(body) in lines


async def test_preserve_host_sends_the_clients_host(start_proxy: StartProxy) -> None:
    """With preserve_host the primary sees the Host the client sent."""
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url, preserve_host=True)]) as proxy, \
            aiohttp.ClientSession() as http:
        await (await http.get(f"http://127.0.0.1:{proxy.port}/",
                              headers={"Host": "models.example"})).read()
    assert primary.seen[0].headers["host"] == "models.example"


async def test_primary_down_gives_502_and_is_recorded(
        start_proxy: StartProxy, database_url: str) -> None:
    """An unreachable primary gives a JSON 502 and a record with the connect error."""
    async with serve(model("v1")) as gone:
        dead_url = gone.url
    async with start_proxy([route(dead_url)]) as proxy, aiohttp.ClientSession() as http:
        resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", json={})
        assert resp.status == 502
        body = await resp.json()
        assert body["request_id"] == resp.headers["X-Request-Id"]
        await wait_for_rows(database_url, "responses", 1)
    row = await fetchrow(database_url, "SELECT status, error FROM shadowproxy.responses")
    assert row["status"] is None and row["error"].startswith("connect:")
    # The id in the answer is the one the record is stored under.
    assert await fetchrow(database_url, "SELECT 1 FROM shadowproxy.requests "
                                        "WHERE request_id = $1", body["request_id"])


async def test_primary_timeout_gives_504_and_is_recorded(
        start_proxy: StartProxy, database_url: str) -> None:
    """A primary slower than its timeout_s gives a JSON 504, recorded as 'timeout'."""
    from tests.upstreams import hanging

    async with serve(hanging()) as primary, \
            start_proxy([{"name": "r", "primary": {"url": primary.url, "timeout_s": 0.3}}]
                        ) as proxy, aiohttp.ClientSession() as http:
        resp = await http.get(f"http://127.0.0.1:{proxy.port}/slow")
        assert resp.status == 504
        assert "did not answer in time" in (await resp.json())["error"]
        await wait_for_rows(database_url, "responses", 1)
    assert await fetchval(database_url, "SELECT error FROM shadowproxy.responses") == "timeout"


async def test_error_statuses_pass_through_unchanged(start_proxy: StartProxy) -> None:
    """The primary's 4xx/5xx statuses and bodies reach the client as they are."""
    async with serve(model("v1")) as primary, start_proxy([route(primary.url)]) as proxy, \
            aiohttp.ClientSession() as http:
        for status in (400, 404, 500, 503):
            resp = await http.get(f"http://127.0.0.1:{proxy.port}/x?status={status}")
            assert resp.status == status
            assert (await resp.json())["model_version"] == "v1"


async def test_keep_alive_connection_serves_many_requests(start_proxy: StartProxy) -> None:
    """One client connection carries many requests in turn."""
    async with serve(model("v1")) as primary, start_proxy([route(primary.url)]) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        for i in range(20):
            body = json.dumps({"features": {"a": i}}).encode()
            writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200")
            assert json.loads(body)["prediction"] == i
        writer.close()


async def test_pipelined_requests_are_answered_in_order(start_proxy: StartProxy) -> None:
    """Requests pipelined on one connection get their responses in order."""
    async with serve(model("v1")) as primary, start_proxy([route(primary.url)]) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        for i in range(5):
            body = json.dumps({"features": {"a": i}}).encode()
            writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
        for i in range(5):
            _, body = await read_response(reader)
            assert json.loads(body)["prediction"] == i
        writer.close()


async def test_latency_is_recorded_below_the_millisecond(
        start_proxy: StartProxy, database_url: str) -> None:
    """Latencies are measured with a fine clock, not the event loop's millisecond ticks."""
    from tests.upstreams import sleeping

    async with serve(sleeping(0.0123, model("v1"))) as primary, \
            start_proxy([route(primary.url)]) as proxy, aiohttp.ClientSession() as http:
        for _ in range(3):
            await (await http.post(f"http://127.0.0.1:{proxy.port}/p", json={})).read()
        await wait_for_rows(database_url, "responses", 3)
    latencies = [r["latency_ms"] for r in
                 await fetch(database_url, "SELECT latency_ms FROM shadowproxy.responses")]
    assert all(12.3 <= ms < 200 for ms in latencies), latencies
    assert any(ms != round(ms) for ms in latencies), latencies


async def test_headers_named_in_any_connection_header_are_dropped(
        start_proxy: StartProxy) -> None:
    """Tokens of a second Connection header are hop-by-hop too."""
    async with serve(model("v1")) as primary, start_proxy([route(primary.url)]) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /p HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n"
                     b"Connection: X-Hop\r\nX-Hop: secret\r\nX-Kept: yes\r\n\r\n")
        head, _ = await read_response(reader)
        writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    assert "x-hop" not in primary.seen[0].headers
    assert primary.seen[0].headers["x-kept"] == "yes"
