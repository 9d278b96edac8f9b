"""The data path end to end: real upstreams on 127.0.0.1, a real PostgreSQL."""

from __future__ import annotations

import asyncio
import gzip
import json

import aiohttp
import asyncpg

from tests.conftest import StartProxy, route
from tests.upstreams import model, serve


async def wait_for_rows(url: str, table: str, n: int, timeout: float = 10.0) -> None:
    """Poll until ``table`` has ``n`` rows (the recorder flushes every 50 ms in tests)."""
    conn = await asyncpg.connect(url)
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            count = await conn.fetchval(f"SELECT count(*) FROM shadowproxy.{table}")
            if count >= n or asyncio.get_running_loop().time() > deadline:
                assert count == n, f"{table}: expected {n} rows, found {count}"
                return
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


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

    conn = await asyncpg.connect(database_url)
    try:
        pair = await conn.fetchrow("SELECT * FROM shadowproxy.pairs")
        req = await conn.fetchrow("SELECT * FROM shadowproxy.requests")
    finally:
        await conn.close()
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
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchval(
            "SELECT body_json->>'prediction' FROM shadowproxy.responses WHERE role='primary'")
        raw_stored = await conn.fetchval(
            "SELECT body FROM shadowproxy.responses WHERE role='primary'")
    finally:
        await conn.close()
    assert stored == "1.0"
    assert raw_stored == raw
