"""The generation report on traffic recorded through the real proxy from two chat services.

Two example chat services (``examples/chat_service.py``) run on 127.0.0.1, "small" as the
primary and "large" as the shadow; the example chat traffic (``examples/chat_traffic.py``,
unstreamed, or all streamed) goes through a real proxy, which records every pair in
PostgreSQL; the reference answers are imported as labels. The report's figures are then
recomputed from the models themselves: what each one answers to each recorded request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from examples.chat_service import Answer, Speed, answer, build_app, wants_json
from examples.chat_traffic import Mix, send
from shadowproxy.compare.config import CompareConfig
from shadowproxy.compare.labels import import_labels, read_labels
from shadowproxy.compare.report import build_report
from shadowproxy.compare.tables import sections
from shadowproxy.compare.window import Window
from tests.compare.test_generation import ref_normalize
from tests.compare.test_generation_report import check_distribution, is_json, similarity
from tests.conftest import StartProxy
from tests.proxy.test_data_path import wait_for_rows
from tests.upstreams import serve_app

N = 120


FAST = Speed(0.002, 0.0002)


@asynccontextmanager
async def chat_service(model: str, speed: Speed = FAST) -> AsyncIterator[str]:
    """One model of the example service on a free port (a few ms to the first token). Its
    answers' `created` is fixed: the real clock's second differed between a primary and a
    shadow that answered across a second's turn (a loaded machine), and the field diff
    counted the pair as differing."""
    async with serve_app(build_app((model,), speed, clock=lambda: 1)) as url:
        yield url


def model_answer(model: str, request: dict[str, Any]) -> Answer:
    prompt = request["messages"][-1]["content"]
    return answer(model, prompt, tool="get_weather" if request.get("tools") else None,
                  json_mode=wants_json(request))


@pytest.mark.slow
async def test_generation_report_through_the_proxy(
        start_proxy: StartProxy, database_url: str, tmp_path: Path) -> None:
    """small vs large through the proxy, unstreamed: the task is inferred, and the texts,
    finish reasons, tool calls, JSON validity, usage, labels and latency of the report are
    those of the two models' answers to the recorded requests."""
    async with chat_service("small") as primary, chat_service("large") as shadow, start_proxy(
            [{"name": "chat", "match": {"path_prefix": "/v1/", "methods": ["POST"]},
              "primary": {"url": primary}, "shadows": [{"name": "large", "url": shadow}]}]
    ) as proxy:
        labels = tmp_path / "labels.csv"
        result = await send(f"http://127.0.0.1:{proxy.port}/v1/chat/completions", N,
                            mix=Mix(stream=0.0, weather=0.2, long=0.1, json=0.15),
                            concurrency=8, seed=7, labels=labels)
        assert result.ok == N
        await wait_for_rows(database_url, "responses", 2 * N)

    conn = await asyncpg.connect(database_url)
    try:
        await import_labels(conn, *read_labels(labels))
        recorded = await conn.fetch("""
            SELECT q.request_id, q.body_json::text AS request, p.latency_ms AS pl,
                   s.latency_ms AS sl, s.stream IS NULL AND p.stream IS NULL AS no_stream
            FROM shadowproxy.requests q
            JOIN shadowproxy.responses p ON p.request = q.id AND p.role = 'primary'
            JOIN shadowproxy.responses s ON s.request = q.id AND s.role = 'shadow'""")
        now = datetime.now(UTC)
        r = await build_report(conn, route="chat", shadow="large",
                               window=Window(now - timedelta(hours=1), now),
                               compare=CompareConfig())
    finally:
        await conn.close()
    assert all(row["no_stream"] for row in recorded) and len(recorded) == N

    g = r["generation"]
    assert g["task_source"].startswith("inferred: ")
    assert (g["n_pairs"], g["n_compared"]) == (N, N)
    requests = {row["request_id"]: json.loads(row["request"]) for row in recorded}
    answers = {rid: (model_answer("small", body), model_answer("large", body))
               for rid, body in requests.items()}
    texts = [(a.text or "", b.text or "") for a, b in answers.values()
             if a.text is not None or b.text is not None]
    t = g["text"]
    assert t["exact_match"]["count"] == sum(a == b for a, b in texts)
    assert t["exact_match"]["n"] == len(texts)
    assert t["normalized_match"]["count"] == sum(ref_normalize(a) == ref_normalize(b)
                                                 for a, b in texts)
    check_distribution(t["similarity"], [similarity(a, b) for a, b in texts])
    assert g["finish_reason"]["agreement"]["count"] == sum(
        a.finish_reason == b.finish_reason for a, b in answers.values())
    either = [(a, b) for a, b in answers.values() if a.tool_call or b.tool_call]
    assert g["tool_calls"]["n_either"] == len(either) > 0
    assert g["tool_calls"]["same_calls"]["count"] == sum(
        bool(a.tool_call and b.tool_call and a.tool_call.name == b.tool_call.name
             and json.loads(a.tool_call.arguments) == json.loads(b.tool_call.arguments))
        for a, b in either)
    asked = [(a, b) for rid, (a, b) in answers.items() if wants_json(requests[rid])]
    assert g["json"]["n_asked"] == len(asked) > 0
    assert g["json"]["primary"]["count"] == sum(is_json(a.text) for a, _ in asked)
    assert g["json"]["shadow"]["count"] == sum(is_json(b.text) for _, b in asked)
    for k, side in enumerate(("primary", "shadow")):
        assert g["usage"][side]["completion_tokens"] == sum(
            pair[k].completion_tokens for pair in answers.values())
        # Unstreamed: the timing is the whole call's latency, as recorded.
        timing = g["timing"][side]
        check_distribution(timing["latency_ms"],
                           [row["pl" if side == "primary" else "sl"] for row in recorded])
        assert timing["streamed"] == timing["ttft_ms"]["n"] == 0
    references = read_labels(labels)[0]
    labelled = [(answers[rid][0].text, answers[rid][1].text, json.loads(ref))
                for rid, ref in references.items()]
    assert g["labels"]["n"] == len(labelled) > 0
    assert g["labels"]["exact_match"]["shadow"]["count"] == len(labelled)  # large's texts
    assert g["labels"]["exact_match"]["primary"]["count"] == sum(a == ref
                                                                 for a, _, ref in labelled)
    reasons = " ".join(x["message"] for x in r["verdict"]["reasons"])
    assert r["verdict"]["status"] == "warn"
    assert "finish_reason agrees on" in reasons and "the same tool calls" in reasons


@pytest.mark.slow
async def test_generation_report_on_streamed_answers_through_the_proxy(
        start_proxy: StartProxy, database_url: str) -> None:
    """small vs large through the proxy, every request streamed: both sides' answers are
    assembled, the text figures are those of the two models' answers, and the timing
    figures (time to first token, gaps, tokens per second) are the distributions of the
    stored ``responses.stream``, each at least the delays the services were given."""
    n = 40
    speed = Speed(0.02, 0.002)  # small: 20 ms to the first token, 2 ms a token; large 40, 3
    async with chat_service("small", speed) as primary, chat_service("large", speed) as shadow, \
            start_proxy([{"name": "chat", "match": {"path_prefix": "/v1/", "methods": ["POST"]},
                          "primary": {"url": primary},
                          "shadows": [{"name": "large", "url": shadow}]}]) as proxy:
        result = await send(f"http://127.0.0.1:{proxy.port}/v1/chat/completions", n,
                            mix=Mix(stream=1.0, weather=0.2, long=0.1, json=0.1),
                            concurrency=8, seed=11)
        assert result.ok == n
        await wait_for_rows(database_url, "responses", 2 * n)

    conn = await asyncpg.connect(database_url)
    try:
        recorded = await conn.fetch("""
            SELECT q.body_json::text AS request, p.stream::text AS ps, s.stream::text AS ss
            FROM shadowproxy.requests q
            JOIN shadowproxy.responses p ON p.request = q.id AND p.role = 'primary'
            JOIN shadowproxy.responses s ON s.request = q.id AND s.role = 'shadow'""")
        now = datetime.now(UTC)
        r = await build_report(conn, route="chat", shadow="large",
                               window=Window(now - timedelta(hours=1), now),
                               compare=CompareConfig())
    finally:
        await conn.close()
    assert len(recorded) == n
    g = r["generation"]
    assert (g["n_pairs"], g["n_compared"]) == (n, n)
    assert g["streamed_unassembled"] == {"primary": 0, "shadow": 0}
    answers = [(model_answer("small", body), model_answer("large", body))
               for body in (json.loads(row["request"]) for row in recorded)]
    texts = [(a.text or "", b.text or "") for a, b in answers
             if a.text is not None or b.text is not None]
    assert g["text"]["exact_match"]["count"] == sum(a == b for a, b in texts)
    assert g["finish_reason"]["agreement"]["count"] == sum(
        a.finish_reason == b.finish_reason for a, b in answers)
    for k, side in enumerate(("primary", "shadow")):
        assert g["usage"][side]["completion_tokens"] == sum(
            pair[k].completion_tokens for pair in answers)
    for side, column, (ttft_ms, token_ms) in (("primary", "ps", (20.0, 2.0)),
                                               ("shadow", "ss", (40.0, 3.0))):
        streams = [json.loads(row[column]) for row in recorded]
        timing = g["timing"][side]
        assert timing["streamed"] == n
        for key in ("ttft_ms", "gap_p50_ms", "gap_p99_ms", "tokens_per_s"):
            check_distribution(timing[key], [s[key] for s in streams if s[key] is not None])
        assert timing["ttft_ms"]["n"] == n and timing["ttft_ms"]["min"] >= ttft_ms
        # (Loose: on a busy machine a late read can bring two chunks at once.)
        assert timing["gap_p50_ms"]["min"] >= 0.5 * token_ms
        assert 0 < timing["tokens_per_s"]["max"] <= 1000.0 / (0.5 * token_ms)


def _vllm_style(model: str) -> web.Application:
    """A chat service that streams as vLLM does: the first chunk is ``{"role": "assistant",
    "content": ""}`` whatever follows, and a tool call comes in ``tool_calls`` deltas; its
    unstreamed answer to a tool call has ``content: null``. A request with ``tools`` is
    answered with a call, any other with a text."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        call = {"id": "call_0", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        tool = bool(body.get("tools"))
        text = None if tool else f"It is sunny ({model})."
        finish = "tool_calls" if tool else "stop"
        head = {"id": "chatcmpl-1", "created": 1, "model": model}
        if not body.get("stream"):
            message = {"role": "assistant", "content": text}
            if tool:
                message["tool_calls"] = [call]
            return web.json_response({**head, "object": "chat.completion", "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}]})
        deltas = [{"role": "assistant", "content": ""},
                  {"tool_calls": [{"index": 0, **call}]} if tool else {"content": text}, {}]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, delta in enumerate(deltas):
            chunk = {**head, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": delta, "logprobs": None,
                 "finish_reason": finish if i == len(deltas) - 1 else None}]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    return app


async def test_streamed_answers_that_only_call_a_tool_are_not_compared_on_text(
        start_proxy: StartProxy, database_url: str) -> None:
    """Through the proxy, a vLLM-style stream that only calls a tool assembles to content ""
    (its role chunk's), where the same answer unstreamed has content null: either way the
    pair is compared by its tool calls alone, not counted as two equal texts."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    async with serve_app(_vllm_style("small")) as primary, \
            serve_app(_vllm_style("large")) as shadow, \
            start_proxy([{"name": "chat", "match": {"path_prefix": "/v1/"},
                          "primary": {"url": primary},
                          "shadows": [{"name": "large", "url": shadow}]}]) as proxy, \
            aiohttp.ClientSession() as session:
        for stream in (False, True):
            for body in ({"tools": tools}, {}):
                async with session.post(
                        f"http://127.0.0.1:{proxy.port}/v1/chat/completions",
                        json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                              "stream": stream, **body}) as response:
                    assert response.status == 200
                    await response.read()
        await wait_for_rows(database_url, "responses", 8)

    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM shadowproxy.responses "
                                   "WHERE body_json #>> '{choices,0,message,content}' = ''"
                                   " AND stream IS NOT NULL") == 2  # both sides, streamed
        now = datetime.now(UTC)
        r = await build_report(conn, route="chat", shadow="large",
                               window=Window(now - timedelta(hours=1), now),
                               compare=CompareConfig(task="generation"))
    finally:
        await conn.close()
    g = r["generation"]
    assert g["n_compared"] == 4
    # The two text answers differ; the two tool-call pairs are compared by their calls.
    assert g["text"]["exact_match"] == {"count": 0, "n": 2, "rate": 0.0}
    assert g["text"]["similarity"]["n"] == 2 and g["text"]["similarity"]["max"] < 1.0
    assert g["tool_calls"]["n_either"] == 2
    assert g["tool_calls"]["same_calls"]["count"] == 2


async def _report_with_streams_the_client_left(
        start_proxy: StartProxy, database_url: str, n: int, left: set[int]) -> dict[str, Any]:
    """The same model as primary and shadow, every request streamed; on the requests of
    ``left`` the client stops reading after a few tokens (a "stop" button) and the proxy
    cuts the primary's stream. The report of the recorded pairs."""
    speed = Speed(0.005, 0.01)
    async with chat_service("small", speed) as primary, chat_service("small", speed) as shadow, \
            start_proxy([{"name": "chat", "match": {"path_prefix": "/v1/", "methods": ["POST"]},
                          "primary": {"url": primary},
                          "shadows": [{"name": "twin", "url": shadow}]}]) as proxy:
        async def one(i: int) -> None:
            body = json.dumps({"model": "small", "stream": True, "messages": [
                {"role": "user", "content": f"Tell me one useful thing about topic {i}."}]})
            async with aiohttp.ClientSession() as http, http.post(
                    f"http://127.0.0.1:{proxy.port}/v1/chat/completions", data=body,
                    headers={"Content-Type": "application/json"}) as resp:
                if i not in left:
                    assert b"data: [DONE]" in await resp.read()
                    return
                tokens = 0
                async for line in resp.content:
                    tokens += b'"content": "' in line or b'"content":"' in line
                    if tokens == 3:
                        break
                resp.close()  # the client leaves mid-stream

        await asyncio.gather(*(one(i) for i in range(n)))
        await wait_for_rows(database_url, "responses", 2 * n)

    conn = await asyncpg.connect(database_url)
    try:
        cut = await conn.fetchval("SELECT count(*) FROM shadowproxy.responses WHERE role = "
                                  "'primary' AND error_kind = 'closed' AND body_json IS NOT NULL"
                                  " AND (stream ->> 'interrupted')::bool")
        now = datetime.now(UTC)
        r = await build_report(conn, route="chat", shadow="twin",
                               window=Window(now - timedelta(hours=1), now),
                               compare=CompareConfig())
    finally:
        await conn.close()
    assert cut == len(left)
    return dict(r)


async def test_streams_the_client_left_are_not_compared(
        start_proxy: StartProxy, database_url: str) -> None:
    """Pairs whose primary stream the client left are counted in ``cut_short`` and left
    out: the shadow is not blamed for the text and the finish_reason the primary never
    finished, and the rest agree."""
    n, left = 10, {0, 4, 7}
    r = await _report_with_streams_the_client_left(start_proxy, database_url, n, left)
    g = r["generation"]
    assert not [x for x in r["verdict"]["reasons"] if x["section"] == "generation"]
    assert g["finish_reason"]["pairs"] == {"stop": {"stop": n - len(left)}}
    assert (g["n_pairs"], g["n_compared"]) == (n - len(left), n - len(left))
    assert g["text"]["exact_match"]["count"] == n - len(left)
    assert g["cut_short"] == {"primary": len(left), "shadow": 0}
    assert g["sample"] == {"n": n, "of": n, "sampled": False, "seed": g["sample"]["seed"]}


async def test_field_diff_leaves_out_streams_the_client_left(
        start_proxy: StartProxy, database_url: str) -> None:
    """The field diff leaves out the same pairs as the generation section and counts them:
    the twin's answers differ in no field (the cut ones differed in the text and the
    finish_reason), and the window's counts still hold every comparable pair."""
    n, left = 10, {0, 4, 7}
    r = await _report_with_streams_the_client_left(start_proxy, database_url, n, left)
    d = r["diff"]
    assert r["counts"]["comparable_pairs"] == n
    assert (d["comparable_pairs"], d["compared_pairs"]) == (n, n - len(left))
    assert d["cut_short"] == {"primary": len(left), "shadow": 0}
    assert not d["sampled"]
    assert (d["identical"], d["identical_share"]) == (n - len(left), 1.0)
    assert d["fields"] and all(f["n_differ"] == 0 and f["n_present"] == n - len(left)
                               for f in d["fields"])
    assert d["worst"] == []
    text = "\n".join(" ".join(s.notes) for s in sections(r) if s.key == "diff")
    assert "their pairs not compared: primary 3, shadow 0" in text
