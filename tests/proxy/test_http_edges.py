"""HTTP/1.1 at the edges of the client side: answers of the proxy's own to HEAD requests,
a request pipelined behind one whose answer broke off, a refusal pipelined behind answers,
clients that half-close, ``Expect: 100-continue``, an upstream's transfer codings, and
repeated ``X-Forwarded-For`` lines. Real upstreams on 127.0.0.1, raw client sockets."""

from __future__ import annotations

import asyncio
import gzip

import pytest

from tests.conftest import StartProxy, route
from tests.db import fetch
from tests.proxy.test_data_path import wait_for_rows
from tests.upstreams import closing, raw_server, serve, sleeping

Log = list[tuple[bytes, bytes]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request as the upstream receives it: (head, body); the proxy sends bodies with
    Content-Length or chunked."""
    head = await reader.readuntil(b"\r\n\r\n")
    low = head.lower()
    body = b""
    if b"content-length:" in low:
        body = await reader.readexactly(int(low.split(b"content-length:")[1].split(b"\r\n")[0]))
    elif b"transfer-encoding: chunked" in low:
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
    return head, body


def answering(log: Log, body: bytes = b"hello") -> object:
    """An upstream that answers every request 200 with ``body``, noting (request line, head)."""

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            log.append((head.split(b"\r\n")[0], head))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    return closing(respond)


async def talk(port: int, data: bytes, *, quiet_s: float = 1.0,
               half_close: bool = False) -> bytes:
    """Send ``data`` and return what the proxy answers until it closes, or until it has
    said nothing for ``quiet_s``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    if half_close:
        writer.write_eof()
    out = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), quiet_s):
            out += chunk
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()
    return out


async def _expect_continue(port: int, path: bytes, expect: bytes) -> tuple[bytes, bytes]:
    """POST a 3-byte body with ``Expect: <expect>``, sending the body once the interim
    answer is in: (the interim answer's head, the final answer's head)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                 b"Expect: " + expect + b"\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    writer.write(b"abc")
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    writer.close()
    return interim, final


async def test_an_answer_of_the_proxys_own_to_a_head_request_has_no_body(
        start_proxy: StartProxy) -> None:
    """RFC 9110 §9.3.2: a keep-alive client takes a body after a HEAD answer for the start
    of the next answer. The 404 of a path no route takes and the 502 of a dead primary are
    heads alone, and the connection serves the next request."""
    log: Log = []
    async with raw_server(answering(log)) as url, start_proxy([
            route(url, match={"path_prefix": "/api"}),
            {"name": "dead", "primary": {"url": "http://127.0.0.1:1", "timeout_s": 1},
             "match": {"path_prefix": "/dead"}}]) as proxy:
        unrouted = await talk(proxy.port, b"HEAD /nope HTTP/1.1\r\nHost: x\r\n\r\n"
                                          b"GET /api/a HTTP/1.1\r\nHost: x\r\n\r\n")
        dead = await talk(proxy.port, b"HEAD /dead HTTP/1.1\r\nHost: x\r\n\r\n"
                                      b"GET /api/b HTTP/1.1\r\nHost: x\r\n\r\n")
    for out, status in ((unrouted, b"404"), (dead, b"502")):
        first, rest = out.split(b"\r\n\r\n", 1)
        assert first.startswith(b"HTTP/1.1 " + status), out
        assert b"Content-Length: " in first  # the length a GET's body would have
        assert rest.startswith(b"HTTP/1.1 200 OK") and rest.endswith(b"hello"), out
    assert [line for line, _ in log] == [b"GET /api/a HTTP/1.1", b"GET /api/b HTTP/1.1"]


@pytest.mark.parametrize("stall_s", [0.05, 3.0], ids=["closes", "times-out"])
async def test_a_request_behind_an_answer_that_broke_off_is_never_forwarded(
        start_proxy: StartProxy, database_url: str, stall_s: float) -> None:
    """The primary closes in the middle of answer 1, or stalls there past its 0.5 s
    timeout: the client's connection is cut, and the POST pipelined behind it never reaches
    the primary (no client could get its answer, and a client retrying after the reset
    would repeat its effect) nor the records."""
    log: Log = []

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            log.append((head.split(b"\r\n")[0], head))
            if b" /1 " in head:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
                await writer.drain()
                await asyncio.sleep(stall_s)
                return  # closes in the middle of the body
            writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 7\r\n\r\ncreated")
            await writer.drain()

    async with raw_server(closing(respond)) as url, start_proxy(
            [{**route(url), "primary": {"url": url, "timeout_s": 0.5}}]) as proxy:
        out = await talk(proxy.port, b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
                                     b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n"
                                     b"charge=1", quiet_s=2.0)
        await wait_for_rows(database_url, "responses", 1)
        await asyncio.sleep(0.2)  # time for a forwarded POST to reach the upstream
    assert b"created" not in out
    assert [line for line, _ in log] == [b"GET /1 HTTP/1.1"]
    rows = await fetch(database_url, "SELECT path FROM shadowproxy.requests")
    assert [row["path"] for row in rows] == ["/1"]


async def test_a_refusal_pipelined_behind_an_answer_is_sent_after_it(
        start_proxy: StartProxy) -> None:
    """A smuggling attempt read while request 1 is at the primary: request 1 is answered,
    then the 400 (RFC 9112 §2.2), and the connection closes."""
    async with serve(sleeping(0.2)) as up, start_proxy([route(up.url)]) as proxy:
        out = await talk(proxy.port, b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
                                     b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", quiet_s=3.0)
    first, second = out.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200") and b"Connection: close" not in first, out
    assert second.startswith(b"400") and b"Connection: close" in second, out
    assert [seen.path for seen in up.seen] == ["/1"]


async def test_a_client_that_half_closes_after_its_request_gets_the_answer(
        start_proxy: StartProxy, database_url: str) -> None:
    """``shutdown(SHUT_WR)`` after the request (``nc -N``): the answer is written, then the
    connection closes; a request left incomplete is not forwarded."""
    log: Log = []
    async with raw_server(answering(log)) as url, start_proxy([route(url)]) as proxy:
        out = await talk(proxy.port, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                                     b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n", half_close=True)
        cut = await talk(proxy.port, b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n"
                                     b"\r\nabc", half_close=True)
        await wait_for_rows(database_url, "responses", 2)
    assert out.count(b"hello") == 2 and out.rstrip().endswith(b"hello"), out
    assert b"Connection: close" in out.split(b"HTTP/1.1 ")[-1]
    assert cut == b""
    assert [line for line, _ in log] == [b"GET /a HTTP/1.1", b"GET /b HTTP/1.1"]


async def test_expect_100_continue(start_proxy: StartProxy) -> None:
    """A 100 Continue also for a path no route takes (then its 404, once the body is read);
    none for an HTTP/1.0 client, which must not be sent an interim response (RFC 9110
    §15.2) and sends its body anyway."""
    log: Log = []
    async with raw_server(answering(log)) as url, \
            start_proxy([route(url, match={"path_prefix": "/api"})]) as proxy:
        interim, final = await _expect_continue(proxy.port, b"/other", b"100-continue")
        http10 = await talk(proxy.port, b"POST /api/x HTTP/1.0\r\nContent-Length: 3\r\n"
                                        b"Expect: 100-continue\r\n\r\nabc")
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert final.startswith(b"HTTP/1.1 404")
    assert http10.startswith(b"HTTP/1.1 200") and http10.endswith(b"hello"), http10


async def test_an_http10_request_with_a_transfer_coding_closes_the_connection(
        start_proxy: StartProxy) -> None:
    """RFC 9112 §6.1: after an HTTP/1.0 message with Transfer-Encoding the connection closes,
    whatever its Connection header asks."""
    log: Log = []
    async with raw_server(answering(log)) as url, start_proxy([route(url)]) as proxy:
        out = await talk(proxy.port, b"POST /a HTTP/1.0\r\nConnection: keep-alive\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                         quiet_s=3.0)
    assert out.startswith(b"HTTP/1.1 200") and b"Connection: close" in out, out


@pytest.mark.parametrize("codings", [b"Transfer-Encoding: gzip, chunked\r\n",
                                     b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n"])
async def test_a_primary_answer_with_a_transfer_coding_besides_chunked_is_a_502(
        start_proxy: StartProxy, database_url: str, codings: bytes) -> None:
    """``Transfer-Encoding: gzip, chunked``: relaying the de-chunked bytes would hand the
    client gzip as if it were the body, with nothing saying so; on two lines ("chunked",
    then "gzip") the parser would read to the close and relay the chunks' framing. 502,
    recorded as a protocol error."""
    payload = gzip.compress(b'{"a": 1}')

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
                     % (codings, len(payload), payload))
        await writer.drain()
        await reader.read()

    async with raw_server(closing(respond)) as url, start_proxy([route(url)]) as proxy:
        out = await talk(proxy.port, b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_for_rows(database_url, "responses", 1)
    assert out.startswith(b"HTTP/1.1 502") and payload not in out, out
    rows = await fetch(database_url, "SELECT error, error_kind FROM shadowproxy.responses")
    assert rows[0]["error_kind"] == "protocol" and "gzip" in rows[0]["error"]


async def test_repeated_x_forwarded_for_lines_make_one_list(start_proxy: StartProxy) -> None:
    """RFC 9110 §5.3: two X-Forwarded-For lines (a load balancer's appended to a client's)
    are one list; the client's address goes after both."""
    log: Log = []
    async with raw_server(answering(log)) as url, start_proxy([route(url)]) as proxy:
        await talk(proxy.port, b"GET /a HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.1.1.1\r\n"
                               b"X-Forwarded-For: 2.2.2.2\r\n\r\n", quiet_s=0.5)
    assert b"X-Forwarded-For: 1.1.1.1, 2.2.2.2, 127.0.0.1\r\n" in log[0][1]


async def test_white_space_before_the_line_end_is_no_part_of_a_value(
        start_proxy: StartProxy, database_url: str) -> None:
    """RFC 9110 §5.5: white space between a header's value and the end of its line is not
    part of the value (the parser keeps it). An X-Request-Id so sent is the id the client
    gets back, the upstream gets and the record holds, all alike; `Expect: 100-continue `
    gets its 100 Continue."""
    log: Log = []
    async with raw_server(answering(log)) as url, start_proxy([route(url)]) as proxy:
        out = await talk(proxy.port, b"GET /a HTTP/1.1\r\nHost: x\r\n"
                                     b"X-Request-Id: abc \t\r\n\r\n", quiet_s=0.5)
        interim, final = await _expect_continue(proxy.port, b"/b", b"100-continue ")
        await wait_for_rows(database_url, "requests", 2)
    assert b"\r\nX-Request-Id: abc\r\n" in out, out
    assert b"\r\nX-Request-Id: abc\r\n" in log[0][1], log[0][1]
    rows = await fetch(database_url, "SELECT request_id FROM shadowproxy.requests "
                                     "WHERE path = '/a'")
    assert [r["request_id"] for r in rows] == ["abc"]
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert final.startswith(b"HTTP/1.1 200")


async def test_a_fragment_is_neither_forwarded_nor_stored(
        start_proxy: StartProxy, database_url: str) -> None:
    """A request-target has no fragment (RFC 9112 §3.2); one a client sends anyway is cut
    off after a path as after a query: the upstream gets the path, and the record holds it."""
    log: Log = []
    async with raw_server(answering(log)) as url, start_proxy([route(url)]) as proxy:
        await talk(proxy.port, b"GET /a#top HTTP/1.1\r\nHost: x\r\n\r\n"
                               b"GET /b?q=1#top HTTP/1.1\r\nHost: x\r\n\r\n"
                               b"GET /c#top?q=1 HTTP/1.1\r\nHost: x\r\n\r\n", quiet_s=0.5)
        await wait_for_rows(database_url, "requests", 3)
    assert [line for line, _ in log] == [b"GET /a HTTP/1.1", b"GET /b?q=1 HTTP/1.1",
                                         b"GET /c HTTP/1.1"]
    rows = await fetch(database_url, "SELECT path, query FROM shadowproxy.requests "
                                     "ORDER BY path")
    assert [(r["path"], r["query"]) for r in rows] == [("/a", ""), ("/b", "q=1"), ("/c", "")]


async def test_a_target_is_stored_as_sent_in_ascii_and_raw_bytes_beyond_it_are_refused(
        start_proxy: StartProxy, database_url: str) -> None:
    """A percent-encoded path and query are forwarded and stored as sent (``/caf%C3%A9``,
    not ``/café``), as docs/sql.md says; a target with raw bytes beyond ASCII, UTF-8 or
    not, is refused with 400 by the parser before any route sees it, so no path or query
    in SQL ever holds them."""
    log: Log = []
    async with raw_server(answering(log)) as url, start_proxy([route(url)]) as proxy:
        refused = [await talk(proxy.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                              quiet_s=0.5)
                   for target in (b"/caf\xc3\xa9", b"/caf\xe9", b"/a?q=caf\xc3\xa9")]
        await talk(proxy.port, b"GET /caf%C3%A9?q=caf%C3%A9+au+lait HTTP/1.1\r\nHost: x\r\n\r\n",
                   quiet_s=0.5)
        await wait_for_rows(database_url, "requests", 1)
    assert all(out.startswith(b"HTTP/1.1 400 ") for out in refused), refused
    assert [line for line, _ in log] == [b"GET /caf%C3%A9?q=caf%C3%A9+au+lait HTTP/1.1"]
    rows = await fetch(database_url, "SELECT path, query FROM shadowproxy.requests")
    assert [(r["path"], r["query"]) for r in rows] == [("/caf%C3%A9", "q=caf%C3%A9+au+lait")]


async def test_a_primary_answer_naming_content_length_in_connection_keeps_its_length(
        start_proxy: StartProxy) -> None:
    """``Connection: Content-Length`` on the primary's answer: the options in Connection
    are removed, but Content-Length is the body's framing. Removed, the client got an
    answer with neither length nor chunking on a connection kept open, read it to the end
    of the connection, and so took the answer to its next, pipelined request as part of
    this one's body."""

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            if b" /1 " in head:
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Content-Length\r\n"
                             b"Content-Length: 5\r\n\r\nfirst")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
            await writer.drain()

    async with raw_server(closing(respond)) as url, start_proxy([route(url)]) as proxy:
        out = await talk(proxy.port, b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
                                     b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n", quiet_s=0.5)
    first, second = out.split(b"HTTP/1.1 ")[1:]
    assert b"\r\nContent-Length: 5\r\n" in first and first.endswith(b"\r\n\r\nfirst"), out
    assert second.endswith(b"\r\n\r\nsecond"), out


async def test_a_204_or_304_with_a_content_length_ends_at_its_head(
        start_proxy: StartProxy) -> None:
    """A primary's 204 with ``Content-Length: 5`` (RFC 9110 §8.6 forbids it) or 304 with
    one (the representation's length): relayed with its headers, and over at its head for
    the proxy as for clients; the answer pipelined behind it arrives whole, and the
    upstream connection is reused."""
    connections = 0

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            head, _ = await read_request(reader)
            status = head.split(b" ")[1][1:]
            if status in (b"204", b"304"):
                writer.write(b"HTTP/1.1 %s X\r\nContent-Length: 5\r\n\r\n" % status)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
            await writer.drain()

    async with raw_server(closing(respond)) as url, start_proxy([route(url)]) as proxy:
        out = await talk(proxy.port, b"GET /204 HTTP/1.1\r\nHost: x\r\n\r\n"
                                     b"GET /200 HTTP/1.1\r\nHost: x\r\n\r\n"
                                     b"GET /304 HTTP/1.1\r\nHost: x\r\n\r\n"
                                     b"GET /200 HTTP/1.1\r\nHost: x\r\n\r\n", quiet_s=0.5)
    answers = out.split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"204", b"200", b"304", b"200"], out
    assert answers[0].endswith(b"\r\n\r\n") and answers[2].endswith(b"\r\n\r\n"), out
    assert answers[1].endswith(b"\r\n\r\nnext") and answers[3].endswith(b"\r\n\r\nnext"), out
    assert connections == 1
