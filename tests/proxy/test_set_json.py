"""``set_json``: fields set in one shadow's copy of a JSON request, never in the primary's."""

from __future__ import annotations

import json

import aiohttp
from aiohttp import web

from shadowproxy.app import Proxy
from shadowproxy.metrics import families
from tests.conftest import StartProxy
from tests.proxy.test_data_path import wait_for_rows
from tests.upstreams import serve


async def echo(request: web.Request) -> web.StreamResponse:
    return web.json_response({"ok": True})


def skipped(proxy: Proxy) -> dict[str, float]:
    """``shadowproxy_shadow_set_json_skipped_total`` by shadow, from the proxy's metrics."""
    out: dict[str, float] = {}
    for fam in families([proxy.metrics.snapshot()]):
        if fam.name == "shadowproxy_shadow_set_json_skipped":
            out = {s.labels["shadow"]: s.value for s in fam.samples if s.name.endswith("_total")}
    return out


async def test_the_shadow_gets_the_edited_body_and_the_primary_the_original_bytes(
        start_proxy: StartProxy, database_url: str) -> None:
    """The primary receives the client's bytes exactly (spacing, key order, a 20-digit
    integer); the shadow with ``set_json`` the edited JSON with its own Content-Length, the
    shadow without it the client's bytes too."""
    sent = (b'{ "stream_options": {"x": 1},\n  "model" : "small", '
            b'"seed": 12345678901234567890, "messages": [{"role": "user", "content": "hi"}] }')
    edits = {"model": "large", "stream_options": {"include_usage": True},
             "messages[0].content": "You are terse.", 'metadata["exp.name"]': "b"}
    async with serve(echo) as primary, serve(echo) as edited, serve(echo) as plain:
        routes = [{"name": "chat", "primary": {"url": primary.url},
                   "shadows": [{"name": "edited", "url": edited.url, "set_json": edits},
                               {"name": "plain", "url": plain.url}]}]
        async with start_proxy(routes) as proxy, aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{proxy.port}/v1/chat/completions",
                                 data=sent,
                                 headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 200
            await wait_for_rows(database_url, "responses", 3)
            assert skipped(proxy) == {"edited": 0, "plain": 0}
    assert primary.seen[0].body == sent == plain.seen[0].body
    got = edited.seen[0]
    assert got.headers["content-length"] == str(len(got.body))
    assert json.loads(got.body) == {
        "stream_options": {"x": 1, "include_usage": True}, "model": "large",
        "seed": 12345678901234567890,
        "messages": [{"role": "user", "content": "You are terse."}],
        "metadata": {"exp.name": "b"}}


async def test_a_body_the_edits_do_not_fit_is_sent_unchanged_and_counted(
        start_proxy: StartProxy, database_url: str) -> None:
    """A body that is not JSON, a JSON list, and an object whose path cannot be followed
    reach the shadow unchanged; each is counted in
    ``shadowproxy_shadow_set_json_skipped_total``."""
    bodies = [b"not json at all", b'[{"model": "small"}]', b'{"messages": "a string"}']
    async with serve(echo) as primary, serve(echo) as shadow:
        routes = [{"name": "chat", "primary": {"url": primary.url},
                   "shadows": [{"name": "cand", "url": shadow.url,
                                "set_json": {"messages[0].content": "x"}}]}]
        async with start_proxy(routes) as proxy, aiohttp.ClientSession() as http:
            for body in bodies:
                async with http.post(f"http://127.0.0.1:{proxy.port}/v1/chat/completions",
                                     data=body) as resp:
                    assert resp.status == 200
            await wait_for_rows(database_url, "responses", 2 * len(bodies))
            assert skipped(proxy) == {"cand": len(bodies)}
    assert sorted(s.body for s in shadow.seen) == sorted(bodies)
    assert all(s.headers["content-length"] == str(len(s.body)) for s in shadow.seen)
