"""Streamed answers through the real proxy: assembled into ``body_json``, timed in
``responses.stream``, for the primary and the shadows, the raw bytes kept for the client."""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from examples.chat_service import Speed, build_app
from tests.conftest import StartProxy, route
from tests.db import fetch, fetchrow
from tests.proxy.test_data_path import wait_for_rows
from tests.upstreams import model, serve, serve_app

pytestmark = pytest.mark.timeout(60)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}


@asynccontextmanager
async def chat_service(*models: str, ttft_s: float = 0.02,
                       token_s: float = 0.002) -> AsyncIterator[str]:
    """The example chat service on a free port, ``created`` fixed so answers repeat."""
    app = build_app(models or ("small",), Speed(ttft_s, token_s), clock=lambda: 1_700_000_000)
    async with serve_app(app) as url:
        yield url


def chat(prompt: str, *, stream: bool, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "small", "messages": [{"role": "user", "content": prompt}],
                            "stream": stream, **extra}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any],
               rid: str) -> bytes:
    async with http.post(url, json=body, headers={"X-Request-Id": rid}) as resp:
        assert resp.status == 200
        return await resp.read()


async def stored(url: str, role: str = "primary") -> dict[str, dict[str, Any]]:
    """Each request's answer of ``role``: body_json, stream, body, flags, by request id."""
    rows = await fetch(url, """
        SELECT q.request_id, r.body_json::text AS body_json, r.stream::text AS stream, r.body,
               r.body_truncated, r.error_kind, r.headers ->> 'content-type' AS content_type
        FROM shadowproxy.responses r JOIN shadowproxy.requests q ON q.id = r.request
        WHERE r.role = $1""", role)
    return {row["request_id"]: {
        "body_json": None if row["body_json"] is None else json.loads(row["body_json"]),
        "stream": None if row["stream"] is None else json.loads(row["stream"]),
        "body": row["body"], "truncated": row["body_truncated"],
        "error_kind": row["error_kind"], "content_type": row["content_type"]} for row in rows}


async def test_streamed_and_unstreamed_answers_are_stored_in_one_shape(
        start_proxy: StartProxy, database_url: str) -> None:
    """The same chat request streamed and unstreamed is stored with equal ``body_json``;
    the streamed one has its timing in ``stream`` and its raw events in ``body``, exactly as
    the client got them."""
    prompts = ["How should I think about caching?", "Give me one tip about queues.",
               "Explain retries to a new engineer."]
    async with chat_service() as primary, start_proxy([route(primary)]) as proxy, \
            aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions"
        got: dict[str, bytes] = {}
        for i, prompt in enumerate(prompts):
            got[f"plain-{i}"] = await post(http, url, chat(prompt, stream=False), f"plain-{i}")
            got[f"sse-{i}"] = await post(http, url, chat(prompt, stream=True), f"sse-{i}")
        await wait_for_rows(database_url, "responses", 2 * len(prompts))
    rows = await stored(database_url)
    for i in range(len(prompts)):
        plain, sse = rows[f"plain-{i}"], rows[f"sse-{i}"]
        assert plain["stream"] is None
        assert sse["content_type"] == "text/event-stream"
        assert sse["body_json"] == plain["body_json"] == json.loads(got[f"plain-{i}"])
        assert sse["body"] == got[f"sse-{i}"] and not sse["truncated"]
        timing = sse["stream"]
        tokens = plain["body_json"]["usage"]["completion_tokens"]
        assert timing["token_chunks"] == tokens and timing["chunks"] == tokens + 3
        assert timing["completion_tokens"] == tokens and timing["interrupted"] is False
        # The service waits 20 ms before the first token, 2 ms between tokens.
        assert timing["ttfb_ms"] < timing["ttft_ms"] <= timing["duration_ms"]
        assert timing["ttft_ms"] >= 20.0 and timing["gap_p50_ms"] >= 1.5
        assert timing["tokens_per_s"] is not None and timing["tokens_per_s"] > 0


async def test_tool_calls_split_across_deltas_are_joined(
        start_proxy: StartProxy, database_url: str) -> None:
    """A tool call streamed as a name and argument pieces in several deltas is stored as the
    unstreamed answer's one call with its whole arguments."""
    prompt = "What is the weather in Paris today?"
    async with chat_service() as primary, start_proxy([route(primary)]) as proxy, \
            aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions"
        plain = json.loads(await post(http, url, chat(prompt, stream=False,
                                                      tools=[WEATHER_TOOL]), "plain"))
        raw = await post(http, url, chat(prompt, stream=True, tools=[WEATHER_TOOL]), "sse")
        await wait_for_rows(database_url, "responses", 2)
    pieces = [c["delta"]["tool_calls"][0]["function"]["arguments"]
              for line in raw.split(b"\n\n") if line.startswith(b"data: {")
              for c in json.loads(line[6:])["choices"] if c["delta"].get("tool_calls")]
    assert len([p for p in pieces if p]) > 2  # the arguments came in pieces
    call = plain["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["arguments"] == "".join(pieces)
    rows = await stored(database_url)
    assert rows["sse"]["body_json"] == plain == rows["plain"]["body_json"]
    assert rows["sse"]["stream"]["token_chunks"] == len(pieces)  # the name's delta too


async def test_an_interrupted_stream_is_stored_as_far_as_it_went(
        start_proxy: StartProxy, database_url: str) -> None:
    """A primary that cuts its connection mid-stream: the client's connection is cut, and
    the record keeps the text so far, no finish_reason, and ``interrupted`` true."""
    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        await resp.write(b"data: " + json.dumps({**base, "choices": [
            {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}).encode()
            + b"\n\n")
        for word in ("Hello", " wor", "ld"):
            await asyncio.sleep(0.01)
            await resp.write(b"data: " + json.dumps({**base, "choices": [
                {"index": 0, "delta": {"content": word}, "finish_reason": None}]}).encode()
                + b"\n\n")
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return resp

    async with serve(cut) as primary, start_proxy([route(primary.url)]) as proxy, \
            aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{proxy.port}/v1/chat/completions",
                             json={"stream": True}) as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        await wait_for_rows(database_url, "responses", 1)
    row = await fetchrow(database_url, "SELECT body_json::text AS j, stream::text AS s, "
                                       "error_kind FROM shadowproxy.responses")
    answer, timing = json.loads(row["j"]), json.loads(row["s"])
    assert row["error_kind"] in ("closed", "reset")
    assert answer["choices"] == [{"index": 0, "logprobs": None, "finish_reason": None,
                                  "message": {"role": "assistant", "content": "Hello world"}}]
    assert timing["interrupted"] is True and timing["token_chunks"] == 3


async def test_a_shadow_streams_while_the_primary_does_not(
        start_proxy: StartProxy, database_url: str) -> None:
    """With ``set_json: {stream: true}`` the shadow streams the same request the primary
    answers in one piece: both answers are stored in one shape, only the shadow's timed."""
    prompts = ["How should I think about indexes?", "What is a common mistake with timeouts?"]
    async with chat_service() as primary, chat_service() as shadow:
        edits = {"stream": True, "stream_options": {"include_usage": True}}
        routes = [{**route(primary), "shadows": [{"name": "s1", "url": shadow,
                                                  "set_json": edits}]}]
        async with start_proxy(routes) as proxy, aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions"
            for i, prompt in enumerate(prompts):
                await post(http, url, chat(prompt, stream=False), f"q{i}")
            await wait_for_rows(database_url, "responses", 2 * len(prompts))
    primaries, shadows = await stored(database_url), await stored(database_url, "shadow")
    for i in range(len(prompts)):
        p, s = primaries[f"q{i}"], shadows[f"q{i}"]
        assert p["stream"] is None and p["content_type"].startswith("application/json")
        assert s["content_type"] == "text/event-stream" and s["body"].startswith(b"data: ")
        assert s["body_json"] == p["body_json"]
        assert s["stream"]["interrupted"] is False and s["stream"]["ttft_ms"] >= 20.0
    same = await fetch(database_url, "SELECT primary_body_json = shadow_body_json AS same "
                                     "FROM shadowproxy.pairs")
    assert [r["same"] for r in same] == [True] * len(prompts)


def _events(words: list[str]) -> list[bytes]:
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    out = [b"data: " + json.dumps({**base, "choices": [
        {"index": 0, "delta": {"content": w}, "finish_reason": None}]}).encode() + b"\n\n"
        for w in words]
    out.append(b"data: " + json.dumps({**base, "choices": [
        {"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode() + b"\n\n")
    return [*out, b"data: [DONE]\n\n"]


async def test_a_gzip_compressed_stream_is_decoded_and_assembled(
        start_proxy: StartProxy, database_url: str) -> None:
    """An event stream sent with Content-Encoding gzip, flushed event by event, reaches the
    client as sent and is stored raw, assembled, and timed by the reads it arrived in."""
    words = ["one", " two", " three", " four", " five"]

    async def gzipped(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Content-Encoding": "gzip"})
        await resp.prepare(request)
        z = zlib.compressobj(wbits=zlib.MAX_WBITS | 16)
        for event in _events(words):
            await resp.write(z.compress(event) + z.flush(zlib.Z_SYNC_FLUSH))
            await asyncio.sleep(0.01)
        await resp.write(z.flush())
        await resp.write_eof()
        return resp

    async with serve(gzipped) as primary, start_proxy([route(primary.url)]) as proxy, \
            aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.post(f"http://127.0.0.1:{proxy.port}/v1/chat/completions",
                             json={"stream": True}) as resp:
            raw = await resp.read()
        await wait_for_rows(database_url, "responses", 1)
    assert zlib.decompress(raw, zlib.MAX_WBITS | 16) == b"".join(_events(words))
    row = await fetchrow(database_url, "SELECT body, body_json::text AS j, stream::text AS s "
                                       "FROM shadowproxy.responses")
    assert row["body"] == raw
    answer, timing = json.loads(row["j"]), json.loads(row["s"])
    assert answer["choices"][0]["message"]["content"] == "one two three four five"
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert timing["token_chunks"] == 5 and timing["interrupted"] is False
    assert timing["gap_p50_ms"] >= 8.0  # each event in its own read, 10 ms apart


async def test_a_stream_gzipped_member_by_member_is_assembled_whole(
        start_proxy: StartProxy, database_url: str) -> None:
    """An event stream whose server gzips each event as a member of its own (RFC 1952
    lets members follow one another) is assembled from every event, not the first."""
    words = ["one", " two", " three"]

    async def members(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Content-Encoding": "gzip"})
        await resp.prepare(request)
        for event in _events(words):
            await resp.write(zlib.compress(event, wbits=zlib.MAX_WBITS | 16))
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    async with serve(members) as primary, start_proxy([route(primary.url)]) as proxy, \
            aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.post(f"http://127.0.0.1:{proxy.port}/v1/chat/completions",
                             json={"stream": True}) as resp:
            raw = await resp.read()
        await wait_for_rows(database_url, "responses", 1)
    row = await fetchrow(database_url, "SELECT body, body_json::text AS j, stream::text AS s "
                                       "FROM shadowproxy.responses")
    assert row["body"] == raw and row["j"] is not None
    answer, timing = json.loads(row["j"]), json.loads(row["s"])
    assert answer["choices"][0]["message"]["content"] == "one two three"
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert timing["token_chunks"] == 3


async def test_a_stream_past_the_recording_cap_is_timed_to_its_end(
        start_proxy: StartProxy, database_url: str) -> None:
    """A stream longer than ``max_body_bytes``: the body and its assembly stop at the cap,
    flagged truncated but not interrupted, and the duration runs to the last byte."""
    words = [f" w{i}" for i in range(60)]

    async def long(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in _events(words):
            await resp.write(event)
            await asyncio.sleep(0.002)
        await resp.write_eof()
        return resp

    async with serve(long) as primary, start_proxy(
            [route(primary.url)], recording={"max_body_bytes": 1500}) as proxy, \
            aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{proxy.port}/v1/chat/completions",
                             json={"stream": True}) as resp:
            assert await resp.read() == b"".join(_events(words))
        await wait_for_rows(database_url, "responses", 1)
    row = await fetchrow(database_url, "SELECT length(body) AS n, body_truncated, "
                                       "body_json::text AS j, stream::text AS s "
                                       "FROM shadowproxy.responses")
    answer, timing = json.loads(row["j"]), json.loads(row["s"])
    assert row["n"] == 1500 and row["body_truncated"]
    kept = timing["token_chunks"]
    assert 0 < kept < 60 and answer["choices"][0]["message"]["content"] == "".join(words[:kept])
    assert timing["truncated"] is True and timing["interrupted"] is False
    # 62 events 2 ms apart: the last byte came well after the last token that was kept.
    assert timing["duration_ms"] >= 60 * 2.0


async def test_redaction_applies_to_the_assembled_answer_and_drops_the_raw_events(
        start_proxy: StartProxy, database_url: str) -> None:
    """With ``redact_json`` matching the assembled answer, ``body_json`` holds "[redacted]"
    and the raw events (which hold the text in pieces) are not stored."""
    async with chat_service() as primary, start_proxy(
            [route(primary)], recording={"redact_json": ["$.choices[*].message.content"]}
    ) as proxy, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions"
        await post(http, url, chat("Give me one tip about schemas.", stream=True), "sse")
        await wait_for_rows(database_url, "responses", 1)
    row = (await stored(database_url))["sse"]
    assert row["body_json"]["choices"][0]["message"]["content"] == "[redacted]"
    assert row["body"] is None and row["truncated"]
    assert row["stream"]["token_chunks"] > 0 and row["stream"]["interrupted"] is False


async def test_a_shadow_streaming_without_end_is_cut_at_max_duration_s(
        start_proxy: StartProxy, database_url: str) -> None:
    """A shadow whose stream never ends (an event every 0.1 s, well within its
    ``timeout_s``) is cut at ``max_duration_s``: the request's record is stored with what
    the shadow sent by then, instead of waiting for the stream as long as it goes on."""
    sent: list[int] = []

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(300):  # 30 s: the test's bound, far past the shadow's
                await resp.write(_events([f" w{i}"])[0])
                sent.append(i)
                await asyncio.sleep(0.1)
        except (ConnectionError, RuntimeError):
            pass  # the proxy cut the call
        return resp

    async with serve(model("v1")) as primary, serve(endless) as shadow:
        routes = [{**route(primary.url), "shadows": [
            {"name": "s1", "url": shadow.url, "timeout_s": 0.5, "max_duration_s": 1.5}]}]
        async with start_proxy(routes) as proxy, aiohttp.ClientSession() as http:
            resp = await http.post(f"http://127.0.0.1:{proxy.port}/p", json={"features": {"a": 3}})
            assert (await resp.json())["prediction"] == 3
            await wait_for_rows(database_url, "responses", 2, timeout=8.0)
            row = await fetchrow(database_url, """
                SELECT error_kind, error, latency_ms, body, stream ->> 'interrupted' AS cut
                FROM shadowproxy.responses WHERE role = 'shadow'""")
    assert row["error_kind"] == "timeout"
    assert row["error"] == "timeout: still answering after max_duration_s (1.5 s)"
    assert 1500 <= row["latency_ms"] < 3000
    assert row["body"].startswith(b"data: ") and row["cut"] == "true"
    assert 10 <= len(sent) < 50  # it streamed past timeout_s, and stopped once cut


async def test_a_first_chunk_of_placeholders_leaves_the_answers_id_and_model(
        start_proxy: StartProxy, database_url: str) -> None:
    """Azure OpenAI opens a stream with a chunk that carries only the prompt's filter
    results, its id, model and object "" and created 0; the answer's id, model and created
    are those of the chunks that follow, as in the answer unstreamed."""
    head = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1_717_000_000,
            "model": "gpt-4o-2024-05-13", "system_fingerprint": "fp_1"}
    events = [{"id": "", "object": "", "created": 0, "model": "", "choices": [],
               "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]},
              {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]},
              {**head, "choices": [{"index": 0, "delta": {"content": "Hi"},
                                    "finish_reason": None}]},
              {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    raw += b"data: [DONE]\n\n"

    async def azure(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(raw)
        await resp.write_eof()
        return resp

    async with serve(azure) as primary, start_proxy([route(primary.url)]) as proxy, \
            aiohttp.ClientSession() as http:
        got = await post(http, f"http://127.0.0.1:{proxy.port}/v1/chat/completions",
                         chat("hi", stream=True), "azure")
        assert got == raw
        await wait_for_rows(database_url, "responses", 1)
    answer = (await stored(database_url))["azure"]["body_json"]
    assert {k: answer.get(k) for k in ("id", "created", "model", "system_fingerprint")} == {
        "id": "chatcmpl-9", "created": 1_717_000_000, "model": "gpt-4o-2024-05-13",
        "system_fingerprint": "fp_1"}
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "Hi"}


async def test_a_shadow_stream_that_cannot_be_assembled_costs_only_its_own_assembly(
        start_proxy: StartProxy, database_url: str) -> None:
    """A shadow whose events give choice indexes of different kinds (``null`` beside ``0``,
    a list) cannot be assembled: its answer is stored as sent, without ``body_json`` and
    ``stream``, and the request, the primary's answer and their headers are stored whole."""
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    odd = [[{"index": None, "delta": {"content": "a"}}, {"index": 0, "delta": {"content": "b"}}],
           [{"index": [0], "delta": {"content": "a"}}]]
    bodies = [b"".join(b"data: " + json.dumps({**base, "choices": [c]}).encode() + b"\n\n"
                       for c in choices) + b"data: [DONE]\n\n" for choices in odd]

    async def candidate(request: web.Request) -> web.Response:
        which = json.loads(await request.read())["messages"][0]["content"]
        return web.Response(body=bodies[int(which)], content_type="text/event-stream")

    async with chat_service() as primary, serve(candidate) as shadow, \
            start_proxy([route(primary, shadow.url)]) as proxy, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions"
        for i in range(len(odd)):
            await post(http, url, chat(str(i), stream=True), f"q{i}")
        await wait_for_rows(database_url, "responses", 2 * len(odd))
    primaries, shadows = await stored(database_url), await stored(database_url, "shadow")
    requests = {r["request_id"]: r for r in await fetch(
        database_url, "SELECT request_id, body_json::text AS j, headers ->> 'x-request-id' "
                      "AS rid, body_truncated FROM shadowproxy.requests")}
    for i in range(len(odd)):
        request, p, s = requests[f"q{i}"], primaries[f"q{i}"], shadows[f"q{i}"]
        assert json.loads(request["j"])["messages"][0]["content"] == str(i)
        assert not request["body_truncated"]
        assert p["body_json"]["object"] == "chat.completion" and p["stream"] is not None
        assert p["body"] and not p["truncated"]
        assert s["body"] == bodies[i] and not s["truncated"]
        assert s["body_json"] is None and s["stream"] is None
        assert s["content_type"].startswith("text/event-stream")


async def test_an_answer_that_writes_an_escape_of_nul_as_text_is_assembled(
        start_proxy: StartProxy, database_url: str) -> None:
    """An answer whose text is about NUL's JSON escape (the six characters ``\\u0000``, no
    NUL character in it) is stored with its ``body_json``, which PostgreSQL takes."""
    text = r'In JSON, NUL is written "\u0000"; a backslash before it, "\\u0000", is text.'

    async def explain(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"".join(_events([text[:20], text[20:]])),
                            content_type="text/event-stream")

    async with serve(explain) as primary, start_proxy([route(primary.url)]) as proxy, \
            aiohttp.ClientSession() as http:
        await post(http, f"http://127.0.0.1:{proxy.port}/v1/chat/completions",
                   chat("How is NUL written in JSON?", stream=True), "nul")
        await wait_for_rows(database_url, "responses", 1)
    row = (await stored(database_url))["nul"]
    assert row["body_json"] is not None, row
    assert row["body_json"]["choices"][0]["message"]["content"] == text
    assert row["stream"]["interrupted"] is False


async def test_a_plain_stream_mislabelled_deflate_is_withheld_under_redaction(
        start_proxy: StartProxy, database_url: str) -> None:
    """A plain event stream labelled ``Content-Encoding: deflate`` whose bytes zlib reads as
    the start of a raw deflate stream (``: ping`` begins a fixed-Huffman block) decodes to
    bytes that are no event stream: with redaction rules its events, which hold a redacted
    field, are withheld, not stored as sent."""
    events = b': ping\n\ndata: {"ssn":1}\n\n'
    assert zlib.decompressobj(-zlib.MAX_WBITS).decompress(events) not in (b"", events)

    async def mislabelled(request: web.Request) -> web.StreamResponse:
        return web.Response(body=events, headers={"Content-Type": "text/event-stream",
                                                  "Content-Encoding": "deflate"})

    async with serve(mislabelled) as primary, start_proxy(
            [route(primary.url)], recording={"redact_json": ["$.ssn"]}) as proxy, \
            aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.post(f"http://127.0.0.1:{proxy.port}/v1/chat/completions",
                             json={"stream": True}) as resp:
            assert await resp.read() == events
        await wait_for_rows(database_url, "responses", 1)
    row = await fetchrow(database_url, "SELECT body, body_truncated, body_json::text AS j "
                                       "FROM shadowproxy.responses")
    assert row["body"] is None and row["body_truncated"] is True and row["j"] is None


@pytest.mark.parametrize("redact", [False, True], ids=["no rules", "redact_json"])
async def test_a_stream_listing_hundreds_of_codings_is_stored_as_sent(
        start_proxy: StartProxy, database_url: str, redact: bool) -> None:
    """A gzip event stream whose Content-Encoding lists 700 codings (`gzip,
    identity, identity, ...`), flushed event by event: each step of undoing the list walked
    every read of the stream, seconds of the recorder's loop for one record. A list longer
    than MAX_CODINGS is not undone: the client gets the stream as sent, the record keeps
    its bytes without an assembled answer, and with redaction rules they are withheld (a
    redacted field could not be looked for), as a stream of an unknown coding's are."""
    words = ["one", " two", " three"]
    coding = "gzip" + ", identity" * 700  # (a header line of 7 kB: clients read 8)

    async def listed(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Content-Encoding": coding})
        await resp.prepare(request)
        z = zlib.compressobj(wbits=zlib.MAX_WBITS | 16)
        for event in _events(words):
            await resp.write(z.compress(event) + z.flush(zlib.Z_SYNC_FLUSH))
            await asyncio.sleep(0.01)
        await resp.write(z.flush())
        await resp.write_eof()
        return resp

    recording = {"redact_json": ["$.choices"]} if redact else {}
    async with serve(listed) as primary, \
            start_proxy([route(primary.url)], recording=recording) as proxy, \
            aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.post(f"http://127.0.0.1:{proxy.port}/v1/chat/completions",
                             json={"stream": True}) as resp:
            raw = await resp.read()
        await wait_for_rows(database_url, "responses", 1)
    assert zlib.decompress(raw, zlib.MAX_WBITS | 16) == b"".join(_events(words))
    row = await fetchrow(database_url, "SELECT body, body_truncated, body_json::text AS j, "
                                       "stream::text AS s FROM shadowproxy.responses")
    assert row["j"] is None and row["s"] is None
    assert row["body"] == (None if redact else raw)
    assert row["body_truncated"] is redact
