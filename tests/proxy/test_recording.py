"""What is stored: redacted secrets, JSON columns, odd bodies."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web

from tests.conftest import StartProxy, route
from tests.db import fetch, fetchval
from tests.proxy.test_data_path import wait_for_rows
from tests.upstreams import closing, model, raw_server, serve


async def dump_database(url: str) -> str:
    """Every stored value as text, to search for secrets."""
    rows = await fetch(
        url, "SELECT q::text AS t FROM shadowproxy.requests q "
        "UNION ALL SELECT r::text FROM shadowproxy.responses r "
        "UNION ALL SELECT encode(body, 'escape') FROM shadowproxy.requests "
        "UNION ALL SELECT encode(body, 'escape') FROM shadowproxy.responses")
    return "\n".join(r["t"] or "" for r in rows)


async def test_secrets_in_headers_and_json_fields_never_reach_the_database(
        start_proxy: StartProxy, database_url: str) -> None:
    """Redacted headers and JSON fields are stored as "[redacted]"; upstreams get them whole."""
    async def echo_secret(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return web.json_response({"prediction": 1, "customer": body["customer"]},
                                 headers={"Set-Cookie": "session=cookie-secret"})

    async with serve(echo_secret) as primary, serve(echo_secret) as shadow, \
            start_proxy([route(primary.url, shadow.url)],
                        recording={"redact_json": ["$.customer.email"]}) as proxy, \
            aiohttp.ClientSession() as http:
        resp = await http.post(
            f"http://127.0.0.1:{proxy.port}/p",
            json={"customer": {"email": "jane@example.com", "age": 40}},
            headers={"Authorization": "Bearer token-secret", "Cookie": "c=cookie-secret",
                     "X-Api-Key": "key-secret"})
        assert (await resp.json())["customer"]["email"] == "jane@example.com"
        assert resp.headers["Set-Cookie"] == "session=cookie-secret"
        await wait_for_rows(database_url, "responses", 2)
    assert primary.seen[0].headers["authorization"] == "Bearer token-secret"
    assert shadow.seen[0].headers["x-api-key"] == "key-secret"
    stored = await dump_database(database_url)
    for secret in ("token-secret", "cookie-secret", "key-secret", "jane@example.com"):
        assert secret not in stored
    headers = json.loads(await fetchval(database_url, "SELECT headers FROM shadowproxy.requests"))
    email = await fetchval(
        database_url, "SELECT body_json #>> '{customer,email}' FROM shadowproxy.requests")
    age = await fetchval(
        database_url, "SELECT body_json #>> '{customer,age}' FROM shadowproxy.requests")
    assert headers["authorization"] == "[redacted]"
    assert email == "[redacted]" and age == "40"


async def test_invalid_json_and_binary_bodies_are_kept_as_bytes(
        start_proxy: StartProxy, database_url: str) -> None:
    """A JSON-typed body that does not parse, and a binary body, keep their bytes, no jsonb."""
    async def echo(request: web.Request) -> web.StreamResponse:
        return web.Response(body=await request.read(), content_type="application/json")

    payloads = [b'{"broken": ', bytes(range(256)), "é{}".encode("latin-1")]
    async with serve(echo) as primary, start_proxy([route(primary.url)]) as proxy, \
            aiohttp.ClientSession() as http:
        for payload in payloads:
            resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", data=payload,
                                   headers={"Content-Type": "application/json"})
            assert await resp.read() == payload
        await wait_for_rows(database_url, "requests", 3)
    rows = await fetch(database_url, "SELECT body, body_json FROM shadowproxy.requests")
    assert sorted(r["body"] for r in rows) == sorted(payloads)
    assert all(r["body_json"] is None for r in rows)


async def test_header_values_are_stored_without_the_white_space_ending_their_line(
        start_proxy: StartProxy, database_url: str) -> None:
    """White space before a header line's end is not part of the value (RFC 9110 §5.5):
    ``headers ->> 'x-model' = 'v2'`` finds a request sent with ``X-Model: v2 <tab>``, and a
    response's padded value is stored trimmed too. The parser keeps it, and it was stored."""
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"Content-Length: 2" in head
        await reader.readexactly(2)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json \r\n"
                     b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
        await writer.drain()

    async with raw_server(closing(respond)) as primary, \
            start_proxy([route(primary)]) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /p HTTP/1.1\r\nHost: h\r\nX-Model: v2 \t\r\nX-Tag: a \r\n"
                     b"X-Tag: b\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        assert (await reader.read()).startswith(b"HTTP/1.1 200 ")
        writer.close()
        await wait_for_rows(database_url, "responses", 1)
    assert await fetchval(database_url, "SELECT count(*) FROM shadowproxy.requests "
                                        "WHERE headers ->> 'x-model' = 'v2'") == 1
    assert await fetchval(database_url,
                          "SELECT headers ->> 'x-tag' FROM shadowproxy.requests") == "a, b"
    assert await fetchval(database_url, "SELECT headers ->> 'content-type' "
                                        "FROM shadowproxy.responses") == "application/json"


async def test_records_are_written_once_write_after_records_wait(
        start_proxy: StartProxy, database_url: str) -> None:
    """With a long flush interval, a batch is still written as soon as enough records wait."""
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url)],
                        recording={"flush_interval_ms": 60_000,
                                   "write_after_records": 3}) as proxy, \
            aiohttp.ClientSession() as http:
        for _ in range(3):
            await (await http.post(f"http://127.0.0.1:{proxy.port}/p", json={})).read()
        await wait_for_rows(database_url, "requests", 3, timeout=5)
