"""Streamed answers in the recorder: assembled into ``body_json`` and ``stream`` rows,
with the event loop given back between streams, through both write paths and old spools."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import asyncpg
import orjson
import pytest

from shadowproxy.config import RecordingConfig
from shadowproxy.metrics import Metrics
from shadowproxy.models import CapturedResponse, Exchange, StreamArrivals
from shadowproxy.recorder.postgres import PostgresWriter
from shadowproxy.recorder.recorder import Recorder
from shadowproxy.recorder.rows import RESPONSE_COLUMNS, RowEncoder, upgrade_rows
from shadowproxy.streams import decode_arrivals
from tests.recorder.exchanges import exchange, exchanges

TOKENS = 300


def sse_answer(target: str, role: str, text: str = "tok") -> CapturedResponse:
    """A finished 200 event-stream answer of ``TOKENS`` content chunks, one piece each,
    1 ms apart."""
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = [b"data: " + orjson.dumps({**base, "choices": [
        {"index": 0, "delta": {"content": f"{text}{i} "}, "finish_reason": None}]}) + b"\n\n"
        for i in range(TOKENS)]
    events.append(b"data: " + orjson.dumps({**base, "choices": [
        {"index": 0, "delta": {}, "finish_reason": "stop"}]}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    r = CapturedResponse(target, role, time.time())
    r.status, r.headers = 200, [(b"Content-Type", b"text/event-stream")]
    r.body = b"".join(events)
    r.body_size = len(r.body)
    now = time.perf_counter()
    r.stream = StreamArrivals(now, now + 0.010)
    offset = 0
    for i, event in enumerate(events):
        r.stream.arrivals.append((offset, now + 0.020 + i * 0.001))
        offset += len(event)
    r.latency_ms = 20.0 + len(events)
    return r


def streamed_batch(n: int) -> list[Exchange]:
    batch = exchanges(n)
    for ex in batch:
        ex.responses = [sse_answer("primary", "primary"), sse_answer("cand", "shadow", "t")]
    return batch


async def test_the_recorder_gives_the_loop_back_between_streams(tmp_path: Path) -> None:
    """Encoding a batch of streamed answers lets the event loop run between each stream's
    assembly (the data path shares the loop), and gives the same rows as encoding at once."""
    recorder = Recorder(RecordingConfig(), "postgresql://unused/x", tmp_path, Metrics())
    batch = streamed_batch(4)
    turns = 0
    stop = False

    async def ticker() -> None:
        nonlocal turns
        while not stop:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = turns
    _, responses = await recorder._encode(batch)
    during = turns - before
    stop = True
    await task
    assert during >= 2 * len(batch)  # at least once per stream
    _, at_once = RowEncoder(RecordingConfig()).encode(batch)
    assert responses == at_once
    stream_at = RESPONSE_COLUMNS.index("stream")
    timing = json.loads(responses[0][stream_at])
    assert timing["token_chunks"] == TOKENS and timing["ttfb_ms"] == pytest.approx(10.0)
    assert timing["ttft_ms"] == pytest.approx(20.0) and timing["gap_p50_ms"] == pytest.approx(1)
    answer = json.loads(responses[0][RESPONSE_COLUMNS.index("body_json")])
    assert answer["choices"][0]["message"]["content"] == "".join(
        f"tok{i} " for i in range(TOKENS))


@pytest.mark.parametrize("checked", [False, True], ids=["copy", "checking path"])
async def test_stream_rows_are_stored_by_both_write_paths(database_url: str,
                                                          checked: bool) -> None:
    """The assembled answer and its timing reach ``body_json`` and ``stream`` by COPY and by
    the checking path; an unstreamed answer's ``stream`` stays NULL."""
    batch = streamed_batch(2) + [exchange(9)]
    writer = PostgresWriter(database_url)
    try:
        await writer.write(*RowEncoder(RecordingConfig()).encode(batch), checked=checked)
    finally:
        await writer.close()
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("""
            SELECT stream ->> 'token_chunks' AS n, body_json #>> '{choices,0,finish_reason}'
                   AS finish, stream IS NULL AS unstreamed
            FROM shadowproxy.responses ORDER BY unstreamed, target""")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [(str(TOKENS), "stop", False)] * 4 + [
        (None, None, True)]


async def test_rows_of_a_spool_file_without_stream_timing_are_stored(
        database_url: str) -> None:
    """Response rows spooled by a version without the ``stream`` column are stored with it
    NULL, the rest as they were."""
    requests, responses = RowEncoder(RecordingConfig()).encode(exchanges(3))
    old_layout = [row[:-1] for row in responses]
    requests, upgraded = upgrade_rows(requests, old_layout)
    assert [row[RESPONSE_COLUMNS.index("stream")] for row in upgraded] == [None] * 3
    writer = PostgresWriter(database_url)
    try:
        await writer.write(requests, upgraded, checked=True)
    finally:
        await writer.close()
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT status, body_json::text AS j, stream "
                                "FROM shadowproxy.responses")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [(200, '{"prediction": 1}', None)] * 3


def test_a_stream_left_unassembled_is_withheld_when_it_may_hold_a_redacted_field() -> None:
    """An event stream that is not OpenAI-compatible goes to the body path, which stores it
    as sent: with redaction rules whose keys its events hold, its bytes are withheld (they
    cannot be redacted in the events' shape); without such keys, or without rules, stored
    as sent. A coding that cannot be undone leaves nothing to tell by: withheld."""
    def stream(events: bytes, coding: bytes | None = None) -> CapturedResponse:
        r = CapturedResponse("primary", "primary", time.time())
        r.status, r.headers = 200, [(b"Content-Type", b"text/event-stream")]
        if coding is not None:
            r.headers.append((b"Content-Encoding", coding))
        r.body, r.body_size = events, len(events)
        now = time.perf_counter()
        r.stream = StreamArrivals(now, now + 0.01)
        r.stream.arrivals.append((0, now + 0.02))
        return r

    secret = b'data: {"patient": {"name": "SECRETSSEZ"}}\n\ndata: [DONE]\n\n'
    plain = b'data: {"score": 0.5}\n\ndata: [DONE]\n\n'
    redacting = RowEncoder(RecordingConfig(redact_json=["$.patient.name"]))
    for r, withheld in ((stream(secret), True), (stream(plain), False),
                        (stream(b"\x00not gzip", b"gzip"), True)):
        ex = exchange(0)
        ex.responses = [r]
        row = dict(zip(RESPONSE_COLUMNS, redacting.encode([ex])[1][0], strict=True))
        assert (row["body"] is None) is withheld, row
        assert row["body_truncated"] is withheld
        assert row["body_json"] is None
    ex = exchange(0)
    ex.responses = [stream(secret)]
    row = dict(zip(RESPONSE_COLUMNS, RowEncoder(RecordingConfig()).encode([ex])[1][0],
                   strict=True))
    assert row["body"] == secret


def test_a_json_body_with_a_byte_order_mark_is_read_and_redacted() -> None:
    """A UTF-8 byte-order mark before a JSON text (RFC 8259 §8.1 lets a parser ignore it) does
    not make the body "not JSON": its fields are redacted and it is stored as JSON."""
    encoder = RowEncoder(RecordingConfig(redact_json=["$.name"]))
    body, text, reason = encoder.body(b'\xef\xbb\xbf{"name": "SECRET"}',
                                      [(b"Content-Type", b"text/plain")])
    assert reason is None and body is not None and text is not None
    assert b"SECRET" not in body and json.loads(text) == {"name": "[redacted]"}


@pytest.mark.parametrize(("coding", "events"), [
    (b"deflate", b': ping\n\ndata: {"ssn":1}\n\n'),
    (b"br", b'\r\n \r\n\r\ndata: {"ssn":1}\r\n\r\n'),  # br reads it to nothing
])
def test_a_plain_stream_mislabelled_deflate_or_br_is_withheld(coding: bytes,
                                                              events: bytes) -> None:
    """Plain events labelled deflate or br, whose bytes the decoder reads as the start of a
    stream (to bytes that are no event stream): with redaction rules they are withheld,
    not stored as sent; without rules, stored as sent, with no ``body_json``."""
    decoded = decode_arrivals(events, [(0, 0.0)], coding, 1000)
    assert decoded is not None and decoded[0] != events
    now = time.perf_counter()
    r = CapturedResponse("primary", "primary", time.time())
    r.status = 200
    r.headers = [(b"Content-Type", b"text/event-stream"), (b"Content-Encoding", coding)]
    r.body, r.body_size = events, len(events)
    r.stream = StreamArrivals(now, now + 0.01)
    r.stream.arrivals.append((0, now + 0.02))
    for config, body in ((RecordingConfig(redact_json=["$.ssn"]), None),
                         (RecordingConfig(), events)):
        ex = exchange(0)
        ex.responses = [r]
        row = dict(zip(RESPONSE_COLUMNS, RowEncoder(config).encode([ex])[1][0], strict=True))
        assert row["body"] == body and row["body_json"] is None, row
