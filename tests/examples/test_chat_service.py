"""The example OpenAI-compatible chat service and its traffic generator, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from examples.chat_service import (
    SMALL_TOKEN_LIMIT,
    Speed,
    answer,
    answer_text,
    build_app,
    differs,
)
from examples.chat_traffic import Mix, send
from examples.traffic import TrafficError

ROOT = Path(__file__).resolve().parents[2]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


class Service:
    def __init__(self, url: str, seen: list[dict[str, Any]]) -> None:
        self.url = url
        self.seen = seen


async def _serve(speed: Speed) -> AsyncIterator[Service]:
    seen: list[dict[str, Any]] = []

    @web.middleware
    async def record(request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        if request.method == "POST":
            with contextlib.suppress(ValueError):
                seen.append(json.loads(await request.read()))
        return await handler(request)

    app = build_app(speed=speed, clock=lambda: 1_700_000_000)
    app.middlewares.append(record)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield Service(f"http://127.0.0.1:{runner.addresses[0][1]}", seen)
    finally:
        await runner.cleanup()


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    """Both models, 20 ms to the first token and 4 ms per token ("small"); bodies recorded."""
    async for s in _serve(Speed(0.02, 0.004)):
        yield s


@pytest.fixture
async def fast_service() -> AsyncIterator[Service]:
    """Both models without delays; bodies recorded."""
    async for s in _serve(Speed()):
        yield s


async def post(url: str, body: Any, path: str = "/v1/chat/completions"
               ) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(url + path, json=body) as r:
        return r.status, await r.json(content_type=None)


def chat(prompt: str, model: str = "small", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}


PROMPTS = [f"Tell me about topic number {i}" for i in range(100)]


def test_models_agree_on_most_prompts_and_differ_on_some() -> None:
    """Over 100 prompts the two models write the same text on 65-90 of them."""
    same = sum(answer("small", p).text == answer("large", p).text for p in PROMPTS)
    assert 65 <= same <= 90
    assert same == sum(not differs(p) for p in PROMPTS)
    for p in PROMPTS[:20]:
        assert answer("small", p) == answer("small", p)  # deterministic


async def test_unstreamed_answer_has_the_openai_shape(service: Service) -> None:
    """A chat completion: id, object, created, model, choices[].message, usage."""
    status, body = await post(service.url, chat("How do caches work?"))
    assert status == 200
    text = answer_text("small", "How do caches work?")
    assert body == {
        "id": body["id"], "object": "chat.completion", "created": 1_700_000_000,
        "model": "small", "system_fingerprint": "fp_small",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": len(text.split()),
                  "total_tokens": 4 + len(text.split())}}
    assert body["id"].startswith("chatcmpl-")


async def test_long_prompts_end_early_on_small_only(service: Service) -> None:
    """Over 40 words, small stops at 40 tokens (length) and large finishes (stop)."""
    prompt = " ".join(["word"] * 50)
    _, small = await post(service.url, chat(prompt, "small"))
    _, large = await post(service.url, chat(prompt, "large"))
    assert small["choices"][0]["finish_reason"] == "length"
    assert small["usage"]["completion_tokens"] == SMALL_TOKEN_LIMIT
    assert large["choices"][0]["finish_reason"] == "stop"
    assert large["usage"]["completion_tokens"] > SMALL_TOKEN_LIMIT
    _, capped = await post(service.url, chat("Hi there", "large", max_tokens=3))
    assert capped["choices"][0]["finish_reason"] == "length"
    assert len(capped["choices"][0]["message"]["content"].split()) == 3


async def test_weather_prompts_call_the_offered_tool(service: Service) -> None:
    """With tools, both models call get_weather with the same JSON arguments (keys in another
    order); on the one-in-five prompts small answers in text; without tools, text."""
    _, small = await post(service.url, chat("What is the weather in Paris?", tools=TOOLS))
    _, large = await post(service.url, chat("What is the weather in Paris?", "large",
                                            tools=TOOLS))
    calls = [b["choices"][0]["message"]["tool_calls"][0] for b in (small, large)]
    assert all(c["function"]["name"] == "get_weather" and c["type"] == "function"
               for c in calls)
    args = [c["function"]["arguments"] for c in calls]
    assert args[0] != args[1]
    assert json.loads(args[0]) == json.loads(args[1]) == {"city": "Paris", "unit": "celsius"}
    assert small["choices"][0]["finish_reason"] == "tool_calls"
    assert small["choices"][0]["message"]["content"] is None
    assert differs("What is the weather in Oslo?")
    _, oslo = await post(service.url, chat("What is the weather in Oslo?", tools=TOOLS))
    assert "Oslo" in oslo["choices"][0]["message"]["content"]
    _, untooled = await post(service.url, chat("What is the weather in Paris?", "large"))
    assert "tool_calls" not in untooled["choices"][0]["message"]


async def test_json_mode_is_valid_json_except_small_on_some_prompts(
        fast_service: Service) -> None:
    """Asked for JSON, large always writes JSON; small fences it in Markdown on some prompts."""
    fmt = {"response_format": {"type": "json_object"}}
    small_valid = large_valid = 0
    prompts = PROMPTS[:30]
    for p in prompts:
        for model in ("small", "large"):
            _, body = await post(fast_service.url, chat(p, model, **fmt))
            try:
                json.loads(body["choices"][0]["message"]["content"])
            except json.JSONDecodeError:
                continue
            if model == "small":
                small_valid += 1
            else:
                large_valid += 1
    assert large_valid == len(prompts)
    assert small_valid == sum(not differs(p) for p in prompts) < len(prompts)


async def read_events(url: str, body: dict[str, Any], path: str = "/v1/chat/completions"
                      ) -> tuple[list[tuple[float, bytes]], float, str]:
    events: list[tuple[float, bytes]] = []
    buffer = b""
    async with aiohttp.ClientSession() as session:
        sent = time.perf_counter()
        async with session.post(url + path, json=body) as resp:
            content_type = resp.headers["Content-Type"]
            async for piece in resp.content.iter_any():
                now = time.perf_counter()
                buffer += piece
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    events.append((now, event))
    assert buffer == b""
    return events, sent, content_type


async def test_streamed_chat_answer_is_openai_sse_with_delays(service: Service) -> None:
    """Role chunk, one token per chunk after the delays, finish chunk, usage chunk, [DONE]."""
    prompt = "Explain retries briefly"
    events, sent, content_type = await read_events(
        service.url, chat(prompt, stream=True, stream_options={"include_usage": True}))
    assert content_type == "text/event-stream"
    assert events[-1][1] == b"data: [DONE]"
    chunks = [json.loads(e[6:]) for _, e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    tokens = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert "".join(tokens) == answer_text("small", prompt)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == len(tokens)
    assert all(c["usage"] is None for c in chunks[:-1])
    times = [t for t, _ in events]
    assert times[0] - sent < times[1] - sent
    assert times[1] - sent >= 0.02  # the time to first token
    gaps = [b - a for a, b in pairwise(times[1:len(tokens) + 1])]
    assert sorted(gaps)[len(gaps) // 2] >= 0.003
    no_usage, _, _ = await read_events(service.url, chat(prompt, stream=True))
    assert all(b'"usage"' not in e for _, e in no_usage)
    assert len(no_usage) == len(events) - 1


async def test_large_model_is_slower_to_the_first_token(service: Service) -> None:
    """large takes twice small's time to the first token."""
    events, sent, _ = await read_events(service.url, chat("Hello", "large", stream=True))
    assert events[1][0] - sent >= 0.04


async def test_streamed_tool_call_arguments_come_in_pieces(service: Service) -> None:
    """A streamed tool call: name and id first, then the arguments over several deltas."""
    events, _, _ = await read_events(service.url, chat("What is the weather in Rome?", "large",
                                                       tools=TOOLS, stream=True))
    deltas = [json.loads(e[6:])["choices"][0]["delta"] for _, e in events[:-1]]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert calls[0]["id"].startswith("call_")
    pieces = [c["function"]["arguments"] for c in calls[1:]]
    assert len(pieces) >= 3
    assert json.loads("".join(pieces)) == {"city": "Rome", "unit": "celsius"}
    assert deltas[0] == {"role": "assistant", "content": None}


async def test_several_choices_interleave(service: Service) -> None:
    """n=2 answers two choices, streamed side by side, each as unstreamed."""
    _, body = await post(service.url, chat("Name a colour", n=2))
    assert [c["index"] for c in body["choices"]] == [0, 1]
    events, _, _ = await read_events(service.url, chat("Name a colour", n=2, stream=True))
    texts = ["", ""]
    for _, e in events[1:-1]:
        for c in json.loads(e[6:])["choices"]:
            texts[c["index"]] += c["delta"].get("content") or ""
    assert texts == [c["message"]["content"] for c in body["choices"]]


async def test_legacy_completions_streamed_and_not(service: Service) -> None:
    """/v1/completions answers with choices[].text, streamed as text pieces."""
    _, body = await post(service.url, {"model": "large", "prompt": "Queues"}, "/v1/completions")
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == answer_text("large", "Queues")
    events, _, _ = await read_events(service.url, {"model": "large", "prompt": "Queues",
                                                   "stream": True}, "/v1/completions")
    pieces = [json.loads(e[6:])["choices"][0]["text"] for _, e in events[:-1]]
    assert "".join(pieces) == body["choices"][0]["text"]


async def test_embeddings_are_deterministic_unit_vectors(service: Service) -> None:
    """Same text, same vector of length 1; shared words give a higher cosine."""
    texts = ["the cache is warm", "the cache is warm", "a warm cache", "zebra crossing"]
    _, body = await post(service.url, {"input": texts}, "/v1/embeddings")
    vectors = [d["embedding"] for d in body["data"]]
    assert [d["index"] for d in body["data"]] == [0, 1, 2, 3]
    assert vectors[0] == vectors[1]
    assert all(math.isclose(math.hypot(*v), 1.0, abs_tol=1e-5) for v in vectors)

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vectors[0], vectors[2]) > cos(vectors[0], vectors[3])
    _, single = await post(service.url, {"input": "the cache is warm"}, "/v1/embeddings")
    assert single["data"][0]["embedding"] == vectors[0]


@pytest.mark.parametrize(("path", "body", "status", "expected"), [
    ("/v1/chat/completions", "not json", 400, "not valid JSON"),
    ("/v1/chat/completions", {"model": "medium", "messages": []}, 404, "does not exist"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages: expected a non-empty list"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {**chat("x"), "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {**chat("x"), "n": 9}, 400, "n: expected 1 to 4"),
    ("/v1/chat/completions", {**chat("x"), "tools": "get_weather"}, 400, "tools"),
    ("/v1/completions", {"prompt": ["a"]}, 400, "prompt: expected a string"),
    ("/v1/embeddings", {"input": []}, 400, "input: expected"),
    ("/v1/embeddings", [1], 400, "expected a JSON object"),
])
async def test_bad_requests_get_openai_errors(service: Service, path: str, body: Any,
                                             status: int, expected: str) -> None:
    """Bad input is a 400 (an unknown model a 404) with an OpenAI-style error naming it."""
    async with aiohttp.ClientSession() as session, session.post(
            service.url + path, data=body if isinstance(body, str) else json.dumps(body),
            headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == status
        error = (await resp.json())["error"]
    assert expected in error["message"]
    assert error["type"] == "invalid_request_error"


async def test_health_and_models(service: Service) -> None:
    """/healthz and /v1/models list the models served."""
    async with aiohttp.ClientSession() as session:
        async with session.get(service.url + "/healthz") as resp:
            assert await resp.json() == {"status": "ok", "models": ["small", "large"]}
        async with session.get(service.url + "/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["small", "large"]


async def test_a_client_leaving_mid_stream_does_not_hurt_the_service(service: Service) -> None:
    """The service keeps answering after a client closes a stream half way."""
    async with aiohttp.ClientSession() as session, session.post(
            service.url + "/v1/chat/completions", json=chat("Tell a story", stream=True)) as r:
        await r.content.readuntil(b"\n\n")
        r.close()
    await asyncio.sleep(0.05)
    status, _ = await post(service.url, chat("Still there?"))
    assert status == 200


def test_only_listed_models_are_served() -> None:
    """An unknown model name is refused when the app is built."""
    with pytest.raises(ValueError, match="expected models among"):
        build_app(["medium"])


async def test_traffic_mixes_kinds_streams_and_writes_reference_labels(
        fast_service: Service, tmp_path: Path) -> None:
    """All requests answered; the stream, tool, long and JSON shares show; labels are the
    large model's answers to the plain questions."""
    labels = tmp_path / "labels.csv"
    service = fast_service
    result = await send(service.url + "/v1/chat/completions", 80, model="small",
                        mix=Mix(stream=0.5, weather=0.2, long=0.1, json=0.1), concurrency=4,
                        labels=labels)
    assert result.sent == result.ok == 80
    bodies = service.seen
    assert len(bodies) == 80
    assert all(b["model"] == "small" for b in bodies)
    streamed = sum(bool(b.get("stream")) for b in bodies)
    assert 25 <= streamed <= 55
    assert all(b["stream_options"] == {"include_usage": True} for b in bodies if b.get("stream"))
    assert 5 <= sum("tools" in b for b in bodies) <= 30
    assert 1 <= sum("response_format" in b for b in bodies) <= 20
    with labels.open() as f:
        rows = list(csv.DictReader(f))
    plain = [b for b in bodies if "tools" not in b and "response_format" not in b
             and not b["messages"][1]["content"].startswith("Here are my notes")]
    assert len(rows) == len(plain)
    assert {r["label"] for r in rows} == {answer_text("large", b["messages"][1]["content"])
                                          for b in plain}


async def test_traffic_repeats_with_a_seed(fast_service: Service) -> None:
    """Two runs with one seed send the same bodies in the same order."""
    service = fast_service
    await send(service.url + "/v1/chat/completions", 6, concurrency=1, seed=4)
    await send(service.url + "/v1/chat/completions", 6, concurrency=1, seed=4)
    assert service.seen[:6] == service.seen[6:]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mix": Mix(stream=1.5)}, "--stream-share"),
    ({"mix": Mix(weather=0.6, long=0.6)}, "add up to more than 1"),
    ({"count": 0}, "at least 1 request"),
    ({"url": "http://10.0.0.1/v1/chat/completions"}, "only sent to this machine"),
])
async def test_traffic_refuses_bad_settings(kwargs: dict[str, Any], message: str) -> None:
    """Shares outside 0..1, a zero count or a remote URL are refused before sending."""
    args: dict[str, Any] = {"url": "http://127.0.0.1:1/v1/chat/completions", "count": 3,
                            **kwargs}
    with pytest.raises(TrafficError, match=message):
        await send(args.pop("url"), args.pop("count"), **args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_module_runs_as_a_command_and_stops_on_sigterm() -> None:
    """`python -m examples.chat_service` serves the named model and exits 0 on SIGTERM."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.chat_service", "--port", str(port), "--model",
         "large", "--ttft-ms", "1"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the chat service did not start"
                time.sleep(0.1)
        traffic = subprocess.run(
            [sys.executable, "-m", "examples.chat_traffic", "--url",
             f"http://127.0.0.1:{port}/v1/chat/completions", "--requests", "5"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
            text=True, timeout=60)
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert f"large on http://127.0.0.1:{port}" in out.decode()
    assert traffic.returncode == 0, traffic.stderr
    assert "5 answered 2xx" in traffic.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "70000"], "expected 1..65535"),
    (["--port", "9000", "--ttft-ms", "-1"], "--ttft-ms: expected 0 or more"),
    (["--port", "9000", "--model", "medium"], "invalid choice"),
])
def test_bad_arguments_are_refused(args: list[str], message: str) -> None:
    """Bad ports, negative delays and unknown models are usage errors."""
    proc = subprocess.run([sys.executable, "-m", "examples.chat_service", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert message in proc.stderr
