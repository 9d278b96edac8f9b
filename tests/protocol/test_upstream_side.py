"""The upstream side fed bytes, and the primary call with its client channel alone."""

from __future__ import annotations

import asyncio
import functools
import time

from shadowproxy.config import Shadow
from shadowproxy.failures import ErrorKind
from shadowproxy.mirror import CompiledShadow, ShadowCall
from shadowproxy.models import CapturedResponse, Exchange
from shadowproxy.primary import READ_PIPELINE, READ_UPSTREAM, ClientChannel, PrimaryCall
from tests.protocol.harness import FakeTransport, Harness, Sink, response, split_response


def shadow_call(h: Harness, method: bytes = b"GET", timeout_s: float = 30.0
                ) -> tuple[ShadowCall, Exchange, Sink]:
    """A call to the harness's pool, recorded on its own exchange (a shadow's kind of call:
    it only captures)."""
    sink = Sink()
    exchange = Exchange("r", time.time(), method.decode(), "/p", "", [], None, "rid")
    exchange.recorder = sink
    shadow = CompiledShadow("r", Shadow(name="s", url="http://model.test:8000",
                                        timeout_s=timeout_s), h.pool, h.metrics)
    record = CapturedResponse("s", "shadow", time.time())
    call = ShadowCall(shadow, exchange, record, method + b" /p HTTP/1.1\r\n\r\n", b"",
                      method == b"HEAD", True, 1000)
    shadow.counters.in_flight += 1
    return call, exchange, sink


async def test_interim_responses_are_skipped() -> None:
    """100 Continue and 103 Early Hints before the answer: only the final response counts."""
    h = Harness()
    up, _ = h.upstream()
    call, exchange, sink = shadow_call(h)
    h.pool.start(call)
    up.data_received(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n"
                     b"Link: </style.css>\r\n\r\n")
    assert not call.done
    up.data_received(response(200, b"final", b"X-Final: 1"))
    record = exchange.responses[0]
    assert (record.status, record.body, record.error) == (200, b"final", None)
    assert record.headers == [(b"X-Final", b"1"), (b"Content-Length", b"5")]
    assert sink.exchanges == [exchange] and h.idle() == 1


async def test_response_head_over_the_cap_is_a_protocol_failure() -> None:
    """A response head larger than limits.max_response_header_bytes fails the call as
    protocol and closes the connection, before the head is complete."""
    h = Harness(limits={"max_response_header_bytes": 2048})
    up, upstream = h.upstream()
    call, exchange, _ = shadow_call(h)
    h.pool.start(call)
    up.data_received(b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"f" * 1000 + b"\r\n")
    assert not call.done
    up.data_received(b"X-Filler: " + b"f" * 1100 + b"\r\n")
    record = exchange.responses[0]
    assert record.error_kind == ErrorKind.PROTOCOL and "larger than 2048 bytes" in record.error
    assert upstream.aborted and h.idle() == 0


async def test_a_body_sent_after_a_head_response_closes_the_connection() -> None:
    """A HEAD answer ends at its head; a body the upstream sends anyway closes the
    connection, and the call still has its answer."""
    h = Harness()
    up, upstream = h.upstream()
    call, exchange, _ = shadow_call(h, b"HEAD")
    h.pool.start(call)
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody")
    record = exchange.responses[0]
    assert (record.status, record.body, record.error) == (200, b"", None)
    assert upstream.aborted and h.idle() == 0


async def test_client_channel_frames_responses_for_its_client() -> None:
    """The channel adds the client's framing: chunked for HTTP/1.1 without a length,
    close-delimited for HTTP/1.0 (lowering keep-alive), Connection when needed."""
    done: list[str] = []
    channel = ClientChannel(lambda: done.append("complete"))
    channel.transport = transport = FakeTransport()

    channel.begin(True, False, False)
    channel.start_response([b"HTTP/1.1 200 OK\r\n"], False, False)
    assert transport.take() == b""  # the head waits for the first piece of body
    channel.send(b"abc")
    channel.end_response()
    assert transport.take() == (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"3\r\nabc\r\n0\r\n\r\n")
    channel.begin(True, True, False)
    channel.start_response([b"HTTP/1.1 200 OK\r\n"], False, False)
    channel.end_response()
    assert transport.take() == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
    assert not channel.keep_alive
    channel.begin(False, False, False)
    channel.start_response([b"HTTP/1.1 204 X\r\n"], False, True)
    channel.answer(502, "no", "rid")  # nothing was sent yet: the error replaces it
    assert transport.take().startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    channel.complete()
    assert done == ["complete"]


async def test_client_channel_reading_pauses_until_no_reason_is_left() -> None:
    """Reading from the client resumes only when every reason to pause it is gone."""
    channel = ClientChannel(lambda: None)
    channel.transport = transport = FakeTransport()
    channel.pause_reading(READ_PIPELINE)
    channel.pause_reading(READ_UPSTREAM)
    channel.resume_reading(READ_PIPELINE)
    assert not transport.reading
    channel.resume_reading(READ_PIPELINE)
    assert not transport.reading
    channel.resume_reading(READ_UPSTREAM)
    assert transport.reading


async def test_primary_call_relays_through_its_channel_alone() -> None:
    """A primary call, given only a channel: the upstream's answer reaches the channel's
    transport, the completion callback runs once, the record has the answer; a failure
    after the head cuts the client's connection."""
    h = Harness()
    route = h.ctx.router.values()[0]
    for cut in (False, True):
        up, upstream = h.upstream()
        done: list[int] = []
        channel = ClientChannel(functools.partial(done.append, 1))
        channel.transport = client = FakeTransport()
        channel.begin(True, False, False)
        exchange = Exchange("r", time.time(), "GET", "/p", "", [], None, "rid")
        call = PrimaryCall(channel, route, exchange, b"GET /p HTTP/1.1\r\n\r\n", b"", False,
                           True, 1000)
        h.pool.start(call)
        assert upstream.take() == b"GET /p HTTP/1.1\r\n\r\n"
        up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        if cut:
            up.connection_lost(None)
            assert client.aborted and done == [1]
            assert exchange.responses[0].error_kind == ErrorKind.CLOSED
            continue
        up.data_received(b"world")
        head, body = split_response(client.take())
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"X-Request-Id: rid" in head
        assert body == b"helloworld" and done == [1]
        assert exchange.responses[0].body == b"helloworld" and h.idle() == 1


async def test_one_endless_response_header_line_is_capped() -> None:
    """A single header line that never ends, read piece by piece, fails the call at the
    cap: the parser holds an unfinished line without reporting it."""
    h = Harness(limits={"max_response_header_bytes": 2048})
    up, upstream = h.upstream()
    call, exchange, _ = shadow_call(h)
    h.pool.start(call)
    up.data_received(b"HTTP/1.1 200 OK\r\nX-Long: ")
    for _ in range(30):
        if call.done:
            break
        up.data_received(b"v" * 100)
    record = exchange.responses[0]
    assert record.error_kind == ErrorKind.PROTOCOL and "larger than 2048 bytes" in record.error
    assert upstream.aborted


async def test_switching_protocols_is_a_protocol_failure() -> None:
    """A 101 answer (and the bytes of another protocol after it) fails the call as
    protocol, and the connection is closed."""
    h = Harness()
    up, upstream = h.upstream()
    call, exchange, _ = shadow_call(h)
    h.pool.start(call)
    up.data_received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"
                     b"Connection: Upgrade\r\n\r\n\x00\x00\x12\x04")
    record = exchange.responses[0]
    assert record.error_kind == ErrorKind.PROTOCOL and "101" in record.error
    assert upstream.aborted and h.idle() == 0


async def test_an_event_stream_records_each_pieces_arrival_and_nothing_else_does() -> None:
    """A ``text/event-stream`` answer gets one (bytes before it, time) pair per piece of
    body and its head's time; past the recording cap only the last piece's pair is kept. A
    JSON answer gets none."""
    h = Harness()
    up, _ = h.upstream()
    call, exchange, _ = shadow_call(h, b"POST")  # records up to 1000 bytes
    h.pool.start(call)
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: Text/Event-Stream; charset=utf-8\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
    record = exchange.responses[0]
    assert record.stream is not None and record.stream.arrivals == []
    assert record.stream.sent_at == call.sent_at <= record.stream.head_at
    piece = b"data: " + b"x" * 392 + b"\n\n"  # 400 bytes
    for _ in range(5):
        up.data_received(b"%x\r\n%s\r\n" % (len(piece), piece))
    up.data_received(b"0\r\n\r\n")
    arrivals = record.stream.arrivals
    assert [offset for offset, _ in arrivals] == [0, 400, 800, 1600]
    times = [t for _, t in arrivals]
    assert record.stream.head_at <= times[0] <= times[1] <= times[2] <= times[3]
    assert (record.body_size, len(record.body or b""), record.body_truncated) == (2000, 1000,
                                                                                  True)
    call, exchange, _ = shadow_call(h, b"POST")
    h.pool.start(call)
    up.data_received(response(200, b'{"a": 1}', b"Content-Type: application/json"))
    assert exchange.responses[0].stream is None and exchange.responses[0].body == b'{"a": 1}'


async def test_calls_with_different_timeouts_in_one_pool_each_time_out_on_their_own() -> None:
    """The pool's one timer is armed for the earliest deadline: a short timeout started
    after a long one is not held back by it."""
    h = Harness()
    h.upstream()
    h.upstream()
    long_call, long_exchange, _ = shadow_call(h, timeout_s=5.0)
    short_call, short_exchange, _ = shadow_call(h, timeout_s=0.1)
    h.pool.start(long_call)
    h.pool.start(short_call)
    await asyncio.sleep(0.3)
    assert short_call.done and short_exchange.responses[0].error_kind == ErrorKind.TIMEOUT
    assert not long_call.done and long_exchange.responses[0].error_kind is None
    long_call.cancel(ErrorKind.SHUTDOWN, "test over")


async def test_a_stream_of_hung_calls_times_out_each_call_neither_early_nor_much_late(
) -> None:
    """Calls started one after another against an upstream that never answers: each fails
    as a timeout, none before its deadline, and no timer is left once none is in flight."""
    h = Harness()
    calls = []
    for _ in range(40):
        h.upstream()
        call, exchange, _ = shadow_call(h, timeout_s=0.15)
        h.pool.start(call)
        calls.append((call, exchange))
        await asyncio.sleep(0.002)
    ended: dict[int, float] = {}
    deadline = time.perf_counter() + 2.0
    while len(ended) < len(calls) and time.perf_counter() < deadline:
        for i, (call, _) in enumerate(calls):
            if call.done and i not in ended:
                ended[i] = time.perf_counter()
        await asyncio.sleep(0.001)
    assert len(ended) == len(calls)
    for i, (call, exchange) in enumerate(calls):
        assert exchange.responses[0].error_kind == ErrorKind.TIMEOUT
        late = ended[i] - call.deadline
        assert 0.0 <= late < 0.1, (i, late)  # the slack is 10 ms; the rest is the loop
    assert not h.pool.active and h.pool._timer is None


async def test_a_call_that_ends_is_not_timed_out_when_its_deadline_passes() -> None:
    h = Harness()
    up, _ = h.upstream()
    call, exchange, _ = shadow_call(h, timeout_s=0.05)
    h.pool.start(call)
    up.data_received(response(200, b"in time"))
    await asyncio.sleep(0.15)
    record = exchange.responses[0]
    assert (record.status, record.body, record.error_kind) == (200, b"in time", None)
    assert h.idle() == 1 and h.pool._timer is None
