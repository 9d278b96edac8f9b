"""The client side fed bytes: what reaches the primary, and what the client gets back."""

from __future__ import annotations

from tests.protocol.harness import FakeTransport, Harness, response, split_response

GET = b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n"


def dechunk(body: bytes) -> bytes:
    """The data of a chunked body (which must be complete)."""
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert body == b"\r\n", body
            return out
        out, body = out + body[:size], body[size + 2:]


def forwarded(transport: FakeTransport) -> tuple[bytes, bytes]:
    """(head, body) of what the proxy wrote to the upstream since the last look."""
    return split_response(transport.take())


async def test_pipelined_requests_go_one_at_a_time_and_are_answered_in_order() -> None:
    """Three requests in one read: each is forwarded once the previous one is answered,
    on the same keep-alive connection, and the answers leave in order."""
    h = Harness()
    up, upstream = h.upstream()
    conn, client = h.client()
    conn.data_received(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in (1, 2, 3)))
    for i in (1, 2, 3):
        sent = upstream.take()
        assert sent.startswith(b"GET /%d HTTP/1.1\r\n" % i) and sent.count(b"HTTP/1.1") == 1
        up.data_received(response(200, b"answer %d" % i))
    out = client.take()
    assert out.count(b"HTTP/1.1 200") == 3
    assert out.index(b"answer 1") < out.index(b"answer 2") < out.index(b"answer 3")
    assert h.idle() == 1 and not client.closed


async def test_reading_pauses_while_16_requests_wait() -> None:
    """Reading from a pipelining client pauses at 16 waiting requests and resumes once
    fewer than 8 wait."""
    h = Harness()
    up, _ = h.upstream()
    conn, client = h.client()
    conn.data_received(GET * 20)  # one is answered, 19 wait
    assert not client.reading
    for answered in range(1, 13):
        up.data_received(response())
        assert client.reading == (answered >= 12), answered


async def test_chunked_trailers_in_both_directions_stay_out_of_the_heads() -> None:
    """Request trailers are not forwarded; response trailers are neither relayed as
    headers nor recorded with the response's headers."""
    h = Harness()
    up, upstream = h.upstream()
    conn, client = h.client()
    conn.data_received(b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\nAuthorization: s\r\n\r\n")
    head, body = forwarded(upstream)
    assert body == b"abcde" and b"Content-Length: 5\r\n" in head
    assert b"X-Trailer" not in head and b"Authorization" not in head
    up.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"2\r\nhi\r\n0\r\nX-Response-Trailer: t\r\n\r\n")
    head, body = split_response(client.take())
    assert b"Transfer-Encoding: chunked" in head and b"Trailer" not in head
    assert body == b"2\r\nhi\r\n0\r\n\r\n"
    exchange = h.sink.exchanges[0]
    assert [n for n, _ in exchange.headers] == [b"Host", b"Transfer-Encoding"]
    assert exchange.responses[0].headers == [(b"Transfer-Encoding", b"chunked")]


async def test_expect_100_continue() -> None:
    """Expect: 100-continue gets an interim 100 at once; the request is forwarded without
    the Expect header once its body is in; a pipelined request gets no 100."""
    h = Harness()
    up, upstream = h.upstream()
    conn, client = h.client()
    conn.data_received(b"POST /p HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                       b"Content-Length: 3\r\n\r\n")
    assert client.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert upstream.take() == b""
    conn.data_received(b"abc" + b"POST /q HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                b"Content-Length: 1\r\n\r\n")
    head, body = forwarded(upstream)
    assert body == b"abc" and b"Expect" not in head
    assert client.take() == b""  # the pipelined request's body is expected without a 100
    conn.data_received(b"z")
    up.data_received(response(200, b"first"))
    assert upstream.take().endswith(b"\r\n\r\nz")
    up.data_received(response(200, b"second"))
    out = client.take()
    assert b"100 Continue" not in out and out.count(b"HTTP/1.1 200") == 2


async def test_http10_client_gets_an_answer_it_can_frame() -> None:
    """An HTTP/1.0 client: the upstream gets HTTP/1.1; a chunked answer reaches the client
    unchunked and ended by closing; with keep-alive asked and a length, it stays open."""
    h = Harness()
    up, upstream = h.upstream()
    conn, client = h.client()
    conn.data_received(b"GET /p HTTP/1.0\r\n\r\n")
    assert upstream.take().startswith(b"GET /p HTTP/1.1\r\nHost: model.test:8000\r\n")
    up.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    up.data_received(b"0\r\n\r\n")
    head, body = split_response(client.take())
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert body == b"abc" and client.closed

    conn, client = h.client()
    conn.data_received(b"GET /p HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    up.data_received(response(200, b"abc"))
    head, body = split_response(client.take())
    assert b"Connection: keep-alive" in head and b"Content-Length: 3" in head
    assert body == b"abc" and not client.closed


REQUEST = (b"POST /split?q=1 HTTP/1.1\r\nHost: x\r\nX-Request-Id: fixed-id\r\n"
           b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\n{\"a\":\r\n4;ext=1\r\n 12}\r\n0\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n6\r\n{\"b\": \r\n3\r\n34}\r\n0\r\n\r\n")


async def test_a_request_and_a_response_split_at_every_byte() -> None:
    """Wherever a read boundary falls in the request or in the response, the primary gets
    the same request and the client the same response."""
    h = Harness()
    up, upstream = h.upstream()

    def exchange(request_at: int, response_at: int) -> tuple[bytes, bytes, bytes]:
        conn, client = h.client()
        for piece in (REQUEST[:request_at], REQUEST[request_at:]):
            if piece:  # a transport never delivers empty reads
                conn.data_received(piece)
        sent = upstream.take()
        for piece in (RESPONSE[:response_at], RESPONSE[response_at:]):
            if piece:
                up.data_received(piece)
        record = h.sink.exchanges[-1]
        head, body = split_response(client.take())  # chunk boundaries follow the reads
        return sent, head + dechunk(body), record.body + b"|" + (record.responses[0].body or b"")

    whole = exchange(len(REQUEST), len(RESPONSE))
    assert whole[0].endswith(b"\r\n\r\n{\"a\": 12}")
    assert whole[1].endswith(b"Transfer-Encoding: chunked\r\n\r\n{\"b\": 34}")
    assert whole[2] == b'{"a": 12}|{"b": 34}'
    for at in range(1, len(REQUEST)):
        assert exchange(at, len(RESPONSE)) == whole, at
    for at in range(1, len(RESPONSE)):
        assert exchange(len(REQUEST), at) == whole, at
    assert h.idle() == 1


async def test_a_response_ended_by_closing_the_connection() -> None:
    """A response without length ends when the upstream closes: the HTTP/1.1 client gets
    it chunked and keeps its connection; the upstream connection is not reused."""
    h = Harness()
    up, _ = h.upstream()
    conn, client = h.client()
    conn.data_received(GET)
    up.data_received(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart1")
    up.data_received(b"part2")
    up.connection_lost(None)
    head, body = split_response(client.take())
    assert b"Transfer-Encoding: chunked" in head and b"Connection: close" not in head
    assert body == b"5\r\npart1\r\n5\r\npart2\r\n0\r\n\r\n"
    assert not client.closed and h.idle() == 0
    record = h.sink.exchanges[0].responses[0]
    assert (record.status, record.body, record.error) == (200, b"part1part2", None)


async def test_bodyless_responses_are_framed_and_pooled_once() -> None:
    """204, 304 (with a Content-Length) and HEAD answers end at their head: the client
    gets no body and no chunked framing, and the connection goes back to the pool once."""
    h = Harness()
    up, upstream = h.upstream()
    conn, client = h.client()
    for request, answer in (
            (GET, b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"),
            (GET, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
            (b"HEAD /p HTTP/1.1\r\nHost: x\r\n\r\n",
             b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")):
        conn.data_received(request)
        upstream.take()
        up.data_received(answer)
        head, body = split_response(client.take())
        assert body == b"" and b"Transfer-Encoding" not in head, head
        assert h.idle() == 1
    conn.data_received(GET)  # the same connection, its parser ready for a response again
    assert upstream.take().startswith(b"GET /p")
    up.data_received(response(200, b"after"))
    assert client.take().endswith(b"\r\n\r\nafter")
    assert h.idle() == 1 and not upstream.closed


async def test_a_response_after_the_response_closes_the_upstream_connection() -> None:
    """A second response glued to a 204 was asked for by nobody: the client gets the 204
    only, and the connection is closed instead of pooled."""
    h = Harness()
    up, upstream = h.upstream()
    conn, client = h.client()
    conn.data_received(GET)
    up.data_received(b"HTTP/1.1 204 No Content\r\n\r\n" + response(200, b"unsolicited"))
    out = client.take()
    assert out.startswith(b"HTTP/1.1 204") and b"unsolicited" not in out
    assert upstream.aborted and h.idle() == 0
    up2, upstream2 = h.upstream()
    up2.data_received(b"HTTP/1.1 200 OK\r\n")  # bytes on an idle connection
    assert upstream2.aborted and h.idle() == 0


async def test_an_early_answer_ends_the_upload() -> None:
    """The primary answers 413 while a streamed body still arrives: the client gets it with
    Connection: close, the rest of the body is dropped, the upstream connection closed."""
    h = Harness(limits={"max_mirror_body_bytes": 10})
    up, upstream = h.upstream()
    conn, client = h.client()
    conn.data_received(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n0123456789")
    head, body = forwarded(upstream)
    assert b"Content-Length: 30" in head and body == b"0123456789"
    up.data_received(response(413, b"too large"))
    head, body = split_response(client.take())
    assert head.startswith(b"HTTP/1.1 413") and b"Connection: close" in head
    assert body == b"too large" and upstream.aborted and h.idle() == 0
    conn.data_received(b"abcdefghij")
    assert not client.closed and client.take() == b"" and upstream.take() == b""
    conn.data_received(b"klmnopqrst")
    assert client.closed
    exchange = h.sink.exchanges[0]
    assert exchange.body == b"0123456789" and exchange.responses[0].status == 413


async def test_nothing_starts_while_the_client_reads_none_of_its_answer() -> None:
    """While the client's socket buffer is full, the primary's answer is not read on and no
    next request starts; they go on once the client reads."""
    h = Harness()
    up, upstream = h.upstream()
    conn, client = h.client()
    conn.data_received(GET)
    assert upstream.take().startswith(b"GET /p")
    conn.pause_writing()  # the transport says the client is not reading
    assert up.reading_paused
    up.data_received(response(200, b"first"))
    assert not up.reading_paused  # resumed as it went back to the pool
    conn.data_received(b"POST /next HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nnext")
    assert upstream.take() == b""
    conn.resume_writing()
    head, body = forwarded(upstream)
    assert head.startswith(b"POST /next") and body == b"next"
    up.data_received(response(200, b"second"))
    out = client.take()
    assert out.index(b"first") < out.index(b"second")
