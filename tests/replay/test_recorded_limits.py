"""What the recording could not keep: redacted headers and truncated bodies, recorded
through a real proxy, replayed honestly and counted."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from shadowproxy.config import RecordingConfig
from shadowproxy.recorder.rows import RowEncoder
from tests.conftest import StartProxy, route
from tests.db import fetch
from tests.proxy.test_data_path import wait_for_rows
from tests.replay.helpers import ROUTE, replay, request, store, write_config
from tests.upstreams import model, serve

pytestmark = pytest.mark.timeout(60)


async def test_redacted_headers_are_left_out_unless_set_header_gives_them(
        start_proxy: StartProxy, database_url: str, tmp_path: Path) -> None:
    """Headers stored as "[redacted]" are not sent as that text: the command says how many
    requests lack them before it starts, and --set-header sends a value instead."""
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url, name=ROUTE)]) as proxy, \
            aiohttp.ClientSession() as http:
        for i in range(4):
            headers = {"X-Tenant": "acme", "Authorization": "Bearer live-secret"}
            if i < 2:
                headers["X-Api-Key"] = "key-secret"
            await http.post(f"http://127.0.0.1:{proxy.port}/predict",
                            json={"features": {"x": i}}, headers=headers)
        await wait_for_rows(database_url, "requests", 4)
    config = write_config(tmp_path, database_url)
    async with serve(model("c")) as target:
        plain = await replay(config, to=target.url, name="plain")
        assert plain.status == 0, plain.err
        given = await replay(config, "--set-header", "Authorization=Bearer replay-token",
                             to=target.url, name="given")
        assert given.status == 0, given.err
    first, second = target.seen[:4], target.seen[4:]
    assert {s.headers["x-tenant"] for s in target.seen} == {"acme"}
    for seen in first:
        assert "authorization" not in seen.headers and "x-api-key" not in seen.headers
    assert {s.headers["authorization"] for s in second} == {"Bearer replay-token"}
    assert sum("x-api-key" in s.headers for s in second) == 0
    assert ('4 requests have headers stored as "[redacted]" (authorization 4, x-api-key 2): '
            "sent without them") in plain.out
    assert '2 requests have headers stored as "[redacted]" (x-api-key 2)' in given.out
    assert '4 sent without their "[redacted]" headers' in plain.out
    assert '2 sent without their "[redacted]" headers' in given.out


async def test_a_redacted_forwarded_for_or_host_is_not_forwarded_as_that_text(
        start_proxy: StartProxy, database_url: str, tmp_path: Path) -> None:
    """With X-Forwarded-For and Host in recording.redact_headers (client addresses are
    personal data), the replay's X-Forwarded-For carries the recorded client address alone
    and there is no X-Forwarded-Host, as the preflight says ("sent without them"); they
    went out as "[redacted], 127.0.0.1" and "[redacted]"."""
    recording = {"redact_headers": ["x-forwarded-for", "host"]}
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url, name=ROUTE)], recording=recording) as proxy, \
            aiohttp.ClientSession() as http:
        await http.post(f"http://127.0.0.1:{proxy.port}/predict", json={"features": {"x": 1}},
                        headers={"X-Forwarded-For": "192.0.2.1", "Host": "models.example"})
        await wait_for_rows(database_url, "requests", 1)
    config = write_config(tmp_path, database_url, recording=recording)
    async with serve(model("c")) as target:
        result = await replay(config, to=target.url)
        assert result.status == 0, result.err
    [seen] = target.seen
    assert seen.headers["x-forwarded-for"] == "127.0.0.1"
    assert "x-forwarded-host" not in seen.headers
    assert "[redacted]" not in json.dumps(seen.headers)
    assert ('1 requests have headers stored as "[redacted]" (host 1, x-forwarded-for 1): '
            "sent without them") in result.out
    assert '1 sent without their "[redacted]" headers' in result.out


async def test_query_parameters_stored_redacted_are_announced_before_sending(
        database_url: str, tmp_path: Path) -> None:
    """A query whose secret parameters recording.redact_query stored as "[redacted]" is sent
    as stored (nothing can give them a value): the preflight says how many requests have
    one, as it says it for redacted headers and JSON fields; it said nothing."""
    await store(database_url, [request(0, query="api_key=abc&x=1"), request(1, query="x=1"),
                               request(2, query="a=1;token=t"), request(3)])
    config = write_config(tmp_path, database_url)
    async with serve(model("c")) as target:
        result = await replay(config, to=target.url)
        assert result.status == 0, result.err
    assert sorted(s.query for s in target.seen) == [
        "", "a=1;token=[redacted]", "api_key=[redacted]&x=1", "x=1"]
    assert ('2 requests have query parameters stored as "[redacted]" '
            "(recording.redact_query): sent as stored") in result.out


async def test_bodies_truncated_at_recording_are_not_sent_but_stored_as_skipped(
        start_proxy: StartProxy, database_url: str, tmp_path: Path) -> None:
    """A request whose body was cut at recording.max_body_bytes cannot be replayed: it is
    announced, not sent, stored as kind 'skipped' (done for the next run) and counted."""
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url, name=ROUTE)],
                        recording={"max_body_bytes": 64}) as proxy, \
            aiohttp.ClientSession() as http:
        for i in range(5):
            pad = "x" * (100 if i < 2 else 0)
            await http.post(f"http://127.0.0.1:{proxy.port}/predict",
                            json={"features": {"x": i}, "note": pad})
        await wait_for_rows(database_url, "requests", 5)
    config = write_config(tmp_path, database_url)
    async with serve(model("c")) as target:
        result = await replay(config, to=target.url)
        assert result.status == 0, result.err
        assert len(target.seen) == 3
        assert all(len(json.loads(s.body)["note"]) == 0 for s in target.seen)
        again = await replay(config, to=target.url)
        assert len(target.seen) == 3
    assert "2 bodies were truncated at recording" in result.out
    assert "skipped   2 (body truncated at recording 2)" in result.out
    assert "stored    5 answers" in result.out
    assert "nothing to replay" in again.out
    rows = await fetch(database_url, """
        SELECT shadow_error_kind, shadow_error, count(*) FROM shadowproxy.pairs
        WHERE shadow_name = 'cand' GROUP BY 1, 2 ORDER BY 3""")
    assert [tuple(r) for r in rows] == [
        ("skipped", "skipped: body truncated at recording", 2), (None, None, 3)]



async def test_a_redacted_host_is_given_a_value_as_the_preflight_says(
        start_proxy: StartProxy, database_url: str, tmp_path: Path) -> None:
    """The recorded Host goes out as X-Forwarded-Host (the target gets its own Host): for a
    Host stored as "[redacted]" the preflight names --set-header X-Forwarded-Host=VALUE,
    which sends it, and --set-header Host says so. The preflight said --set-header
    NAME=VALUE, and --set-header Host=... was refused as set by the replay itself."""
    recording = {"redact_headers": ["host"]}
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url, name=ROUTE)], recording=recording) as proxy, \
            aiohttp.ClientSession() as http:
        await http.post(f"http://127.0.0.1:{proxy.port}/predict", json={"features": {"x": 1}},
                        headers={"Host": "models.example"})
        await wait_for_rows(database_url, "requests", 1)
    config = write_config(tmp_path, database_url, recording=recording)
    async with serve(model("c")) as target:
        plain = await replay(config, to=target.url, name="plain")
        assert plain.status == 0, plain.err
        host = await replay(config, "--set-header", "Host=models.example", to=target.url,
                            name="host")
        given = await replay(config, "--set-header", "X-Forwarded-Host=models.example",
                             to=target.url, name="given")
        assert given.status == 0, given.err
    assert ('1 requests have headers stored as "[redacted]" (host 1): sent without them '
            "(--set-header NAME=VALUE sends a value instead; for host: --set-header "
            "X-Forwarded-Host=VALUE)") in plain.out
    assert host.status == 2 and host.out == ""
    assert ("--set-header Host: the target gets its own Host, as a live shadow does; the "
            "recorded Host goes out as X-Forwarded-Host: give it with --set-header "
            "'X-Forwarded-Host=models.example'") in host.err
    assert "[redacted]" not in given.out and "sent without" not in given.out
    first, second = target.seen
    assert "x-forwarded-host" not in first.headers
    assert second.headers["x-forwarded-host"] == "models.example"
    assert second.headers["host"] == target.url.removeprefix("http://")


async def test_a_redacted_hop_by_hop_header_is_not_announced_as_left_out(
        start_proxy: StartProxy, database_url: str, tmp_path: Path) -> None:
    """Proxy-Authorization, redacted by default, is hop-by-hop: a live shadow never gets it
    and neither does the replay, whatever its stored value. The preflight counts only the
    redacted headers that would have been sent, as the summary does; it announced each
    request with a Proxy-Authorization as sent without it, and the summary said nothing."""
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url, name=ROUTE)]) as proxy, \
            aiohttp.ClientSession() as http:
        for i in range(2):
            headers = {"Proxy-Authorization": "Basic cHJveHk6c2VjcmV0"}
            if i == 0:
                headers["Authorization"] = "Bearer live-secret"
            await http.post(f"http://127.0.0.1:{proxy.port}/predict",
                            json={"features": {"x": i}}, headers=headers)
        await wait_for_rows(database_url, "requests", 2)
    config = write_config(tmp_path, database_url)
    async with serve(model("c")) as target:
        result = await replay(config, to=target.url)
        assert result.status == 0, result.err
    assert not any("proxy-authorization" in s.headers for s in target.seen)
    assert ('1 requests have headers stored as "[redacted]" (authorization 1): '
            "sent without them") in result.out
    assert '1 sent without their "[redacted]" headers' in result.out


async def test_set_json_edits_a_compressed_request_body_as_the_client_sent_it(
        start_proxy: StartProxy, database_url: str, tmp_path: Path) -> None:
    """--set-json on a gzip request body edits the body as the client sent it, its keys in
    their order, also past recording.max_decompressed_bytes (no body_json). It edited the
    stored jsonb instead: keys reordered ({"a", "m", "zz"}), and a body whose jsonb the cap
    left NULL was skipped as having no JSON body."""
    small = b'{"zz": 1, "a": 2, "m": [3, 2]}'
    large = b'{"zz": 1, "a": 2, "m": [3, 2], "pad": "' + b"p" * 200 + b'"}'

    async def echo(request: web.Request) -> web.StreamResponse:
        return web.Response(body=await request.read(), content_type="application/json")

    recording = {"max_decompressed_bytes": 100}
    async with serve(echo) as primary, \
            start_proxy([route(primary.url, name=ROUTE)], recording=recording) as proxy, \
            aiohttp.ClientSession() as http:
        for body in (small, large):
            resp = await http.post(f"http://127.0.0.1:{proxy.port}/p",
                                   data=gzip.compress(body),
                                   headers={"Content-Encoding": "gzip",
                                            "Content-Type": "application/json"})
            assert resp.status == 200
        await wait_for_rows(database_url, "requests", 2)
    stored = await fetch(database_url, "SELECT body_json IS NULL AS none FROM "
                                       "shadowproxy.requests ORDER BY received_at")
    assert [row["none"] for row in stored] == [False, True]
    config = write_config(tmp_path, database_url, recording=recording)
    async with serve(echo) as target:
        result = await replay(config, "--set-json", "$.b=3", to=target.url)
        assert result.status == 0, result.err
        assert "skipped   0" in result.out, result.out
    assert "have no JSON body" not in result.out
    assert ("1 requests have a compressed body stored without its JSON "
            "(recording.max_decompressed_bytes): decoded to be edited, skipped if not JSON "
            "(--set-json needs a JSON body)") in result.out
    sent = sorted((json.loads(s.body) for s in target.seen), key=len)
    assert [list(doc) for doc in sent] == [["zz", "a", "m", "b"], ["zz", "a", "m", "pad", "b"]]
    assert all("content-encoding" not in s.headers for s in target.seen)


async def test_set_json_on_a_body_jsonb_refused_is_announced_as_edited_not_skipped(
        start_proxy: StartProxy, database_url: str, tmp_path: Path) -> None:
    """A plain JSON body that PostgreSQL's jsonb refuses (a \\u0000 escape) is stored with
    body_json NULL, yet is JSON: --set-json edits and sends it, and the preflight says so.
    It said the request had no JSON body and would be skipped, then sent it."""
    nul = b'{"a": "x\\u0000y", "m": 1}'
    plain = b'{"a": "z", "m": 2}'
    form = b"a=1&m=2"

    async def echo(request: web.Request) -> web.StreamResponse:
        return web.Response(body=await request.read(), content_type="application/json")

    async with serve(echo) as primary, \
            start_proxy([route(primary.url, name=ROUTE)]) as proxy, \
            aiohttp.ClientSession() as http:
        for body in (nul, plain, form):
            resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", data=body,
                                   headers={"Content-Type": "application/json"})
            assert resp.status == 200
        await wait_for_rows(database_url, "requests", 3)
    stored = await fetch(database_url, "SELECT body_json IS NULL AS none FROM "
                                       "shadowproxy.requests ORDER BY received_at")
    assert [row["none"] for row in stored] == [True, False, True]
    config = write_config(tmp_path, database_url)
    async with serve(echo) as target:
        result = await replay(config, "--set-json", "$.b=3", to=target.url)
        assert result.status == 0, result.err
    assert "skipped   1" in result.out, result.out
    assert "1 requests have no JSON body: skipped (--set-json needs a JSON body)" in result.out
    assert ("1 requests have a body that looks like JSON stored without its JSON "
            "(PostgreSQL's jsonb refused it: a \\u0000 escape, a lone surrogate, or not "
            "JSON at all): read to be edited, skipped if not JSON "
            "(--set-json needs a JSON body)") in result.out
    sent = sorted(json.loads(s.body)["m"] for s in target.seen)
    assert sent == [1, 2]


async def test_a_repeated_cookie_is_stored_and_replayed_joined_with_semicolons(
        start_proxy: StartProxy, database_url: str, tmp_path: Path) -> None:
    """Cookie lines sent apart (as an HTTP/2 client's are) are stored as one Cookie joined
    with "; " (RFC 6265 §5.4, RFC 9113 §8.2.3), and replay sends that: `a=1, b=2` read as
    one cookie `a` of value "1, b=2". Other repeated headers stay joined with ", "; a
    redacted repeated Cookie is still left out of a replay."""
    recording = {"redact_headers": ["authorization"]}
    sent = [("Cookie", "a=1"), ("Cookie", "b=2"), ("X-Multi", "x"), ("X-Multi", "y")]
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url, name=ROUTE)], recording=recording) as proxy, \
            aiohttp.ClientSession() as http:
        resp = await http.post(f"http://127.0.0.1:{proxy.port}/predict", json={"x": 1},
                               headers=CIMultiDict(sent))
        assert resp.status == 200
        await wait_for_rows(database_url, "requests", 1)
    stored = await fetch(database_url, "SELECT headers->>'cookie' AS c, "
                                       "headers->>'x-multi' AS m FROM shadowproxy.requests")
    assert (stored[0]["c"], stored[0]["m"]) == ("a=1; b=2", "x, y")
    config = write_config(tmp_path, database_url, recording=recording)
    async with serve(model("c")) as target:
        result = await replay(config, to=target.url)
        assert result.status == 0, result.err
    assert target.seen[0].headers["cookie"] == "a=1; b=2"
    assert target.seen[0].headers["x-multi"] == "x, y"

    encoder = RowEncoder(RecordingConfig())  # Cookie redacted by default
    text = encoder.headers([(b"Cookie", b"a=1"), (b"cookie", b"b=2")])
    assert text is not None and json.loads(text) == {"cookie": "[redacted], [redacted]"}
