"""Streamed answers assembled into the unstreamed shape, with their timing (shadowproxy.streams).

The streams are real bytes from the example chat service on 127.0.0.1, read with one arrival
per network read as the data path records them; the expected answers are the same service's
unstreamed answers to the same requests.
"""

from __future__ import annotations

import gzip
import itertools
import re
import time
import tomllib
import zlib
from collections.abc import AsyncIterator
from itertools import pairwise
from typing import Any

import aiohttp
import brotli
import numpy as np
import orjson
import pytest
from aiohttp import web

from examples.chat_service import Speed, build_app, differs
from shadowproxy.streams import Arrival, assemble, body_json_text, decode_arrivals
from tests.deploy.files import ROOT

CREATED = 1_700_000_000
WEATHER_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


@pytest.fixture
async def service() -> AsyncIterator[str]:
    """The example chat service (both models, 15 ms to the first token, 3 ms per token)."""
    runner = web.AppRunner(build_app(speed=Speed(0.015, 0.003), clock=lambda: CREATED))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


class Captured:
    """One streamed response as the data path sees it: bytes, reads and their times."""

    def __init__(self) -> None:
        self.body = bytearray()
        self.arrivals: list[Arrival] = []
        self.event_times: list[float] = []
        """Independently: when each complete event (``\\n\\n``-terminated) was in hand."""
        self.sent_at = 0.0
        self.head_at = 0.0


async def stream(url: str, path: str, request: dict[str, Any]) -> Captured:
    out = Captured()
    async with aiohttp.ClientSession() as session:
        out.sent_at = time.perf_counter()
        async with session.post(url + path, json={**request, "stream": True}) as resp:
            out.head_at = time.perf_counter()
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            async for data in resp.content.iter_any():
                now = time.perf_counter()
                out.arrivals.append((len(out.body), now))
                before = out.body.count(b"\n\n")
                out.body += data
                out.event_times += [now] * (out.body.count(b"\n\n") - before)
    return out


async def plain(url: str, path: str, request: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.post(url + path,
                                                                json=request) as resp:
        assert resp.status == 200
        answer: dict[str, Any] = await resp.json()
        return answer


def _prompt(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]


WITH_USAGE: dict[str, Any] = {"stream_options": {"include_usage": True}}
CHAT_REQUESTS: dict[str, dict[str, Any]] = {
    "text": {"model": "small", "messages": _prompt("How do I start with shadow testing?")},
    "large": {"model": "large", "messages": _prompt("How do I start with shadow testing?")},
    "length": {"model": "small", "messages": _prompt(" ".join(["word"] * 45) + " why")},
    "max_tokens": {"model": "large", "messages": _prompt("Explain caching"), "max_tokens": 5},
    "tool_call": {"model": "large", "messages": _prompt("What is the weather in Lyon?"),
                  "tools": WEATHER_TOOLS},
    "json": {"model": "small", "messages": _prompt("Answer as JSON: what is a proxy?"),
             "response_format": {"type": "json_object"}},
    "two_choices": {"model": "small", "n": 2, "messages": _prompt("Name a colour")},
    "tool_calls_three_choices": {"model": "small", "n": 3, "tools": WEATHER_TOOLS,
                                 "messages": _prompt("What is the weather in Rome?")},
    "weather_in_text": {"model": "small", "tools": WEATHER_TOOLS,
                        "messages": _prompt("What is the weather in Oslo?")},
}


@pytest.mark.parametrize("name", sorted(CHAT_REQUESTS))
async def test_streamed_chat_answer_assembles_to_the_unstreamed_one(service: str,
                                                                    name: str) -> None:
    """The assembled stream equals the service's unstreamed answer to the same request."""
    request = {**CHAT_REQUESTS[name], **WITH_USAGE}
    expected = await plain(service, "/v1/chat/completions", request)
    captured = await stream(service, "/v1/chat/completions", request)
    result = assemble(bytes(captured.body), captured.arrivals, captured.sent_at)
    assert result is not None
    body, timing = result
    assert body == expected
    assert body_json_text(body) is not None
    assert orjson.loads(body_json_text(body) or "") == expected
    assert timing["interrupted"] is False
    assert timing["completion_tokens"] == expected["usage"]["completion_tokens"]


async def test_the_requests_cover_what_they_claim(service: str) -> None:
    """The requests above get a length stop, tool calls, text and several choices."""
    answers = {name: await plain(service, "/v1/chat/completions", request)
               for name, request in CHAT_REQUESTS.items()}
    assert answers["length"]["choices"][0]["finish_reason"] == "length"
    assert answers["max_tokens"]["choices"][0]["finish_reason"] == "length"
    assert answers["text"]["choices"][0]["finish_reason"] == "stop"
    calls = answers["tool_calls_three_choices"]["choices"]
    assert len(calls) == 3
    assert all(len(c["message"]["tool_calls"]) == 1 for c in calls)
    assert "tool_calls" in answers["tool_call"]["choices"][0]["message"]
    assert differs("What is the weather in Oslo?")
    assert "Oslo" in answers["weather_in_text"]["choices"][0]["message"]["content"]
    assert len(answers["two_choices"]["choices"]) == 2


async def test_legacy_completions_stream_assembles_to_the_unstreamed_answer(
        service: str) -> None:
    """A /v1/completions stream (choices[].text) assembles to the unstreamed answer."""
    request = {"model": "large", "prompt": "Write about queues", **WITH_USAGE}
    expected = await plain(service, "/v1/completions", request)
    captured = await stream(service, "/v1/completions", request)
    result = assemble(bytes(captured.body), captured.arrivals, captured.sent_at)
    assert result is not None
    assert result[0] == expected
    assert result[0]["object"] == "text_completion"
    assert result[1]["token_chunks"] == expected["usage"]["completion_tokens"]


async def test_without_include_usage_the_answer_has_no_usage(service: str) -> None:
    """Without stream_options.include_usage there is no usage, and no tokens per second."""
    request = CHAT_REQUESTS["text"]
    expected = await plain(service, "/v1/chat/completions", request)
    captured = await stream(service, "/v1/chat/completions", request)
    result = assemble(bytes(captured.body), captured.arrivals, captured.sent_at)
    assert result is not None
    body, timing = result
    assert "usage" not in body
    assert body == {k: v for k, v in expected.items() if k != "usage"}
    assert timing["completion_tokens"] is None
    assert timing["tokens_per_s"] is None


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


async def test_timing_matches_an_independent_reading_of_the_same_stream(service: str) -> None:
    """TTFB, TTFT, gaps, duration and tokens/s agree with the times the client saw events."""
    request = {**CHAT_REQUESTS["text"], **WITH_USAGE}
    captured = await stream(service, "/v1/chat/completions", request)
    result = assemble(bytes(captured.body), captured.arrivals, captured.sent_at,
                      head_at=captured.head_at)
    assert result is not None
    body, timing = result
    # Independently: events in order are role, tokens..., finish, usage, [DONE].
    events = [e for e in bytes(captured.body).split(b"\n\n") if e]
    assert len(events) == len(captured.event_times)
    tokens = [t for e, t in zip(events, captured.event_times, strict=True)
              if b'"content":"' in e and b'"content":""' not in e]
    sent = captured.sent_at
    n_tokens = body["usage"]["completion_tokens"]
    assert len(tokens) == n_tokens
    gaps = [(b - a) * 1000 for a, b in pairwise(tokens)]
    assert timing["ttfb_ms"] == pytest.approx((captured.head_at - sent) * 1000, abs=0.001)
    assert timing["ttft_ms"] == pytest.approx((tokens[0] - sent) * 1000, abs=0.001)
    assert timing["duration_ms"] == pytest.approx((captured.arrivals[-1][1] - sent) * 1000,
                                                  abs=0.001)
    for q in (50, 90, 99):
        assert timing[f"gap_p{q}_ms"] == pytest.approx(_percentile(gaps, q), abs=0.001)
    assert timing["gap_max_ms"] == pytest.approx(max(gaps), abs=0.001)
    assert timing["chunks"] == len(events) - 1  # every JSON event, not [DONE]
    assert timing["token_chunks"] == n_tokens
    assert timing["tokens_per_s"] == pytest.approx((n_tokens - 1) / (tokens[-1] - tokens[0]),
                                                   rel=1e-3)
    # The role-only first chunk came at once; the first token after the service's 15 ms.
    assert timing["ttfb_ms"] < timing["ttft_ms"]
    assert timing["ttft_ms"] >= 15
    assert timing["gap_p50_ms"] >= 2.5


async def test_interrupted_stream_is_assembled_as_far_as_it_went(service: str) -> None:
    """A stream cut at any byte gives the text so far, interrupted, unfinished choices null."""
    request = {**CHAT_REQUESTS["two_choices"], **WITH_USAGE}
    expected = await plain(service, "/v1/chat/completions", request)
    body = bytes((await stream(service, "/v1/chat/completions", request)).body)
    full = [c["message"]["content"] for c in expected["choices"]]
    first_event_end = body.index(b"\n\n") + 2
    finish_at = body.index(b'"finish_reason":"')
    seen_interrupted = 0
    # Every byte around each blank line, and a stride of the bytes between.
    blank_lines = [i for i in range(len(body)) if body.startswith(b"\n\n", i)]
    cuts = sorted({c for i in blank_lines for c in range(i - 2, i + 4)}
                  | set(range(0, len(body), 7)))
    for cut in (c for c in cuts if 0 <= c < len(body) - 1):
        result = assemble(body[:cut], [(0, 1.0)], 0.5)
        if cut < first_event_end:
            assert result is None  # nothing recognisable arrived
            continue
        assert result is not None
        answer, timing = result
        complete = body[:cut].endswith(b"data: [DONE]\n") or body[:cut].endswith(
            b"data: [DONE]")
        assert timing["interrupted"] is not complete
        seen_interrupted += timing["interrupted"]
        for i, choice in enumerate(answer["choices"]):
            assert full[i].startswith(choice["message"]["content"])
            # The finish chunk is the one event whose end tells a choice finished.
            finished_event_done = body.find(b"\n\n", finish_at) + 2 <= cut
            assert (choice["finish_reason"] is not None) == finished_event_done
    assert seen_interrupted > len(cuts) // 2


def test_cut_after_the_finish_chunk_keeps_finish_reason_and_marks_interrupted() -> None:
    """No [DONE]: interrupted, though the choice that finished keeps its finish_reason."""
    body = (b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"}}]}\n\n'
            b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    result = assemble(body)
    assert result is not None
    assert result[0]["choices"][0]["finish_reason"] == "stop"
    assert result[0]["choices"][0]["message"]["content"] == "Hi"
    assert result[1]["interrupted"] is True


async def test_line_endings_comments_and_multiline_data_are_read_as_the_standard_says(
        service: str) -> None:
    """CRLF, CR, mixed endings, comments, other fields and split data lines change nothing."""
    request = {**CHAT_REQUESTS["tool_call"], **WITH_USAGE}
    expected = await plain(service, "/v1/chat/completions", request)
    body = bytes((await stream(service, "/v1/chat/completions", request)).body)
    events = [e for e in body.split(b"\n\n") if e]

    def rebuild(events: list[bytes], nl: bytes) -> bytes:
        return b"".join(e.replace(b"\n", nl) + nl + nl for e in events)

    # Every JSON event written over several data lines (JSON allows the newline as space).
    multiline = [b"data: " + e[6:].replace(b'","', b'",\ndata: "') for e in events]
    commented = [b": keep-alive\nevent: message\nid: " + str(i).encode() + b"\nretry: 5\n" + e
                 for i, e in enumerate(events)]
    mixed = b"".join(e + (b"\r\n\r\n" if i % 3 == 0 else b"\r\r" if i % 3 == 1 else b"\n\n")
                     for i, e in enumerate(events))
    variants = {
        "crlf": rebuild(events, b"\r\n"), "cr": rebuild(events, b"\r"),
        "multiline": rebuild(multiline, b"\n"), "multiline_crlf": rebuild(multiline, b"\r\n"),
        "comments": b": hello\n\n" + rebuild(commented, b"\n"), "mixed": mixed,
        "bom_and_blank_lines": b"\xef\xbb\xbf\n\n" + body.replace(b"\n\n", b"\n\n\n"),
        "bom": b"\xef\xbb\xbf" + body, "bom_crlf": b"\xef\xbb\xbf" + rebuild(events, b"\r\n"),
        "no_space_after_colon": body.replace(b"data: ", b"data:"),
    }
    assert any(b"\ndata: " in e for e in multiline)
    for name, variant in variants.items():
        result = assemble(variant)
        assert result is not None, name
        assert result[0] == expected, name
        assert result[1]["interrupted"] is False, name
        assert result[1]["chunks"] == len(events) - 1, name


async def test_events_split_across_reads_get_the_time_of_the_read_that_completed_them(
        service: str) -> None:
    """With one read per byte, each event's time is the read holding its last byte."""
    request = {**CHAT_REQUESTS["text"], **WITH_USAGE}
    body = bytes((await stream(service, "/v1/chat/completions", request)).body)
    for nl in (b"\n", b"\r\n"):
        data = body.replace(b"\n", nl) if nl != b"\n" else body
        arrivals = [(i, float(i)) for i in range(len(data))]  # read i arrives at i seconds
        result = assemble(data, arrivals, 0.0)
        assert result is not None
        timing = result[1]
        sep = nl + nl
        first_token = data.index(b'"content":"', data.index(b'"content":""') + 1)
        ends = []
        pos = first_token
        while True:
            end = data.find(sep, pos)
            if end < 0 or data.find(b'"content":"', pos) < 0 or data.find(
                    b'"content":"', pos) > end:
                break
            ends.append(end + len(sep) - 1)  # the last byte of the blank line
            pos = end + len(sep)
        assert timing["ttft_ms"] == ends[0] * 1000
        gaps = [(b - a) * 1000.0 for a, b in pairwise(ends)]
        assert timing["gap_max_ms"] == max(gaps)
        assert timing["gap_p50_ms"] == pytest.approx(_percentile(gaps, 50), abs=0.001)
        assert timing["duration_ms"] == (len(data) - 1) * 1000
        assert timing["ttfb_ms"] == 0


def _chunk(delta: dict[str, Any], index: int = 0, **extra: Any) -> bytes:
    return b"data: " + orjson.dumps(
        {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": index, "delta": delta, **extra}]}) + b"\n\n"


def test_parallel_tool_calls_are_joined_by_their_index() -> None:
    """Two tool calls whose argument pieces interleave come out whole, in index order."""
    body = b"".join([
        _chunk({"role": "assistant", "content": None}),
        _chunk({"tool_calls": [{"index": 1, "id": "b", "type": "function",
                                "function": {"name": "get_time", "arguments": ""}}]}),
        _chunk({"tool_calls": [{"index": 0, "id": "a", "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"ci'}}]}),
        _chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"tz":'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"Oslo"}'}}]}),
        _chunk({"tool_calls": [{"index": 1, "function": {"arguments": '"UTC"}'}}]}),
        _chunk({}, finish_reason="tool_calls"),
        b"data: [DONE]\n\n"])
    result = assemble(body, [(0, 1.0)], 0.0)
    assert result is not None
    message = result[0]["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "a", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
        {"id": "b", "type": "function",
         "function": {"name": "get_time", "arguments": '{"tz":"UTC"}'}}]
    assert result[0]["choices"][0]["finish_reason"] == "tool_calls"
    assert result[1]["token_chunks"] == 5  # the name counts as generated, the role does not


def test_other_text_fields_and_logprobs_are_joined() -> None:
    """reasoning_content and refusal join like content; logprobs content lists extend."""
    lp = {"content": [{"token": "a", "logprob": -0.1}]}
    body = b"".join([
        _chunk({"role": "assistant", "content": "", "refusal": None}, logprobs=None),
        _chunk({"reasoning_content": "Think"}),
        _chunk({"reasoning_content": "ing."}),
        _chunk({"content": "A"}, logprobs=lp),
        _chunk({"content": "B"}, logprobs=lp),
        _chunk({}, finish_reason="stop"), b"data: [DONE]\n\n"])
    result = assemble(body)
    assert result is not None
    choice = result[0]["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "AB", "refusal": None,
                                 "reasoning_content": "Thinking."}
    assert choice["logprobs"] == {"content": lp["content"] * 2}
    assert result[1]["token_chunks"] == 4


def test_error_events_are_kept() -> None:
    """An error event mid-stream, in either common form, is kept as the answer's error."""
    body = (_chunk({"role": "assistant", "content": "Hel"})
            + b'data: {"object": "error", "message": "busy", "code": 503}\n\n'
            + b'data: {"error": {"message": "overloaded", "code": 503}}\n\n')
    result = assemble(body)
    assert result is not None
    assert result[0]["error"] == {"message": "overloaded", "code": 503}
    assert result[0]["choices"][0]["message"]["content"] == "Hel"
    assert result[1]["errors"] == 2
    assert result[1]["chunks"] == 1
    assert result[1]["interrupted"] is True


@pytest.mark.parametrize("body", [
    b"", b"{}", b'{"choices": []}', b"[1, 2]", b"hello", b"   \n",
    b"data: hello\n\n", b"data: [1, 2]\n\n",
    b'event: message_start\ndata: {"type": "message_start", "message": {}}\n\n',
    b'data: {"type": "response.created"}\n\ndata: [DONE]\n\n',
    b"data: [DONE]\n\n",
])
def test_bodies_that_are_not_an_openai_stream_are_left_alone(body: bytes) -> None:
    """JSON, plain text, other SSE protocols and empty streams give None."""
    assert assemble(body, [(0, 1.0)], 0.0) is None


def test_truncated_capture_is_interrupted_only_if_the_call_failed() -> None:
    """A body cut at the recording cap is marked truncated; interrupted follows the call."""
    body = _chunk({"role": "assistant", "content": "Hello"}) + _chunk({"content": " wor"})
    for failed in (False, True):
        result = assemble(body[:-30], [(0, 1.0), (len(body), 2.0)], 0.5, truncated=True,
                          failed=failed)
        assert result is not None
        assert result[1]["truncated"] is True
        assert result[1]["interrupted"] is failed
        assert result[1]["duration_ms"] == 1500.0  # reads past the cap still count


def test_a_byte_order_mark_before_the_first_event_is_dropped() -> None:
    """A stream that starts with a UTF-8 byte-order mark: its first event is read (the mark
    is no part of the `data:` line), and it is timed by its own read."""
    first = _chunk({"role": "assistant", "content": "Hello"})
    body = b"\xef\xbb\xbf" + first + _chunk({"content": " world"}, finish_reason="stop") \
        + b"data: [DONE]\n\n"
    # The first read ends one byte before the first event's blank line: it arrived later.
    result = assemble(body, [(0, 1.0), (len(first) + 2, 2.0), (len(first) + 3, 3.0)], 0.0)
    assert result is not None
    assert result[0]["choices"][0]["message"]["content"] == "Hello world"
    assert (result[1]["chunks"], result[1]["token_chunks"]) == (2, 2)
    assert (result[1]["ttft_ms"], result[1]["gap_max_ms"]) == (2000.0, 1000.0)


def test_times_are_none_without_arrivals() -> None:
    """Without arrivals or a send time the answer is assembled and the times are None."""
    body = _chunk({"content": "x"}) + b"data: [DONE]\n\n"
    result = assemble(body)
    assert result is not None
    assert result[0]["choices"][0]["message"]["content"] == "x"
    assert {k: result[1][k] for k in ("ttfb_ms", "ttft_ms", "duration_ms", "gap_p50_ms")} == {
        "ttfb_ms": None, "ttft_ms": None, "duration_ms": None, "gap_p50_ms": None}
    no_send = assemble(body, [(0, 3.0)])
    assert no_send is not None and no_send[1]["ttft_ms"] is None


def test_nul_characters_cannot_go_to_jsonb() -> None:
    """An answer holding a NUL character has no body_json text (PostgreSQL would refuse it)."""
    assert body_json_text({"a": "x\x00y"}) is None
    assert body_json_text({"a\x00": "x"}) is None
    assert body_json_text({"a": "\\\x00"}) is None  # a backslash, then NUL
    assert body_json_text({"a": "é"}) == '{"a":"é"}'
    # The escape as text (a backslash, then "u0000") is no NUL character: jsonb takes it.
    for text in ("\\u0000", "\\\\\\u0000 and \\\\"):
        assert body_json_text({"a": text}) == orjson.dumps({"a": text}).decode()


def _compressed_reads(reads: list[bytes], encoding: str) -> tuple[bytes, list[Arrival]]:
    out = bytearray()
    arrivals: list[Arrival] = []
    if encoding == "br":
        comp = brotli.Compressor()
        for i, piece in enumerate(reads):
            arrivals.append((len(out), float(i)))
            out += comp.process(piece) + comp.flush()
        out += comp.finish()
        return bytes(out), arrivals
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}[encoding]
    z = zlib.compressobj(wbits=wbits)
    for i, piece in enumerate(reads):
        arrivals.append((len(out), float(i)))
        out += z.compress(piece) + z.flush(zlib.Z_SYNC_FLUSH)
    out += z.flush()
    return bytes(out), arrivals


def _plain_arrivals(reads: list[bytes]) -> list[Arrival]:
    """Each read's offset in the plain bytes, at the time of its index (``_compressed_reads``)."""
    offsets = [0]
    for piece in reads[:-1]:
        offsets.append(offsets[-1] + len(piece))
    return [(o, float(i)) for i, o in enumerate(offsets)]


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_compressed_streams_are_decoded_read_by_read(encoding: str) -> None:
    """A flushed gzip/deflate/br stream decodes with each read's offset in the plain bytes."""
    events = [_chunk({"role": "assistant", "content": ""})] + [
        _chunk({"content": f" w{i}"}) for i in range(5)] + [b"data: [DONE]\n\n"]
    raw, arrivals = _compressed_reads(events, encoding)
    decoded = decode_arrivals(raw, arrivals, encoding.encode(), 1 << 20)
    assert decoded is not None
    plain_body, moved = decoded
    assert plain_body == b"".join(events)
    assert moved == _plain_arrivals(events)
    result = assemble(plain_body, moved, 0.0)
    assert result is not None
    assert result[1]["ttft_ms"] == 1000.0  # the first token was in read 1
    assert result[0]["choices"][0]["message"]["content"] == " w0 w1 w2 w3 w4"


def test_a_stream_with_a_list_of_codings_is_decoded_read_by_read() -> None:
    """``Content-Encoding: gzip, br`` (gzip applied, then br, read by read): undone br
    first, each read keeping its offset in the plain bytes; an unknown coding in the list
    gives None."""
    events = [_chunk({"role": "assistant", "content": ""})] + [
        _chunk({"content": f" w{i}"}) for i in range(4)] + [b"data: [DONE]\n\n"]
    gzipped, gzip_arrivals = _compressed_reads(events, "gzip")
    bounds = [a[0] for a in gzip_arrivals] + [len(gzipped)]
    pieces = [gzipped[a:b] for a, b in itertools.pairwise(bounds)]
    raw, arrivals = _compressed_reads(pieces, "br")
    decoded = decode_arrivals(raw, arrivals, b"gzip, br", 1 << 20)
    assert decoded is not None
    plain_body, moved = decoded
    assert plain_body == b"".join(events)
    assert moved == _plain_arrivals(events)
    assert decode_arrivals(raw, arrivals, b"gzip, zstd", 1 << 20) is None
    assert decode_arrivals(raw, arrivals, b"gzip, br", 100) is None  # past the cap


def test_the_declared_brotli_can_decode_within_a_cap() -> None:
    """Brotli bodies and streams are decoded with ``output_buffer_limit``, which brotli has
    from 1.2.0: the floor in pyproject.toml has it (under 1.1, every exchange with a br
    answer lost all its bodies to a TypeError in the recorder)."""
    brotli.Decompressor().process(brotli.compress(b"x"), output_buffer_limit=2)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = [m.group(1) for d in deps if (m := re.fullmatch(r"brotli>=([\d.]+)", d))]
    assert len(floors) == 1
    assert tuple(int(x) for x in floors[0].split(".")) >= (1, 2)


def test_decoding_refuses_corrupt_unknown_and_oversized_bodies() -> None:
    """Corrupt or unknown encodings and bodies past the cap give None."""
    events = [_chunk({"content": "x" * 100})] * 20
    raw, arrivals = _compressed_reads(events, "gzip")
    assert decode_arrivals(raw, arrivals, b"gzip", 100) is None
    assert decode_arrivals(b"not gzip at all", [(0, 1.0)], b"gzip", 1000) is None
    assert decode_arrivals(raw, arrivals, b"zstd", 1 << 20) is None
    assert decode_arrivals(b"abc", [(0, 1.0)], b"identity", 10) == (b"abc", [(0, 1.0)])
    whole = gzip.compress(b"".join(events))
    decoded = decode_arrivals(whole, [(0, 1.0)], b"gzip", 1 << 20)
    assert decoded is not None and decoded[0] == b"".join(events)
