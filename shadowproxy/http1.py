"""HTTP/1.1 wire format: hop-by-hop rules, request and response heads, error bodies.

Pure functions and constants over bytes, shared by the client side (``proxy.py``,
``primary.py``) and the upstream side (``upstream.py``, ``mirror.py``). Heads are built as
one ``bytes`` object so that each message leaves in a single write.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Final

import httptools

from shadowproxy.models import Headers

# RFC 9110 §7.6.1: never forwarded, in either direction (plus the Connection header's tokens).
HOP_BY_HOP: Final = frozenset({
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-connection", b"proxy-authorization",
})
# Request headers the proxy rewrites itself, so the client's copies are not passed on.
REQUEST_REWRITTEN: Final = HOP_BY_HOP | {
    b"host", b"content-length", b"expect", b"x-request-id", b"x-forwarded-for",
    b"x-forwarded-proto", b"x-forwarded-host",
}
# Response headers the proxy rewrites: framing is its own, and X-Request-Id is always its.
RESPONSE_REWRITTEN: Final = HOP_BY_HOP | {b"x-request-id"}
RESPONSE_REWRITTEN_LENGTHS: Final = frozenset(len(name) for name in RESPONSE_REWRITTEN)

# RFC 9110 §9.2.2: repeating one of these has the same effect as sending it once.
IDEMPOTENT_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# Responses that never have a body, whatever their headers say (RFC 9110 §15.3.5, §15.4.5).
NO_BODY_STATUS: Final = frozenset({204, 304})

CRLF: Final = b"\r\n"
CHUNKED_END: Final = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


# Request headers the client side notes while parsing, so the data path never rescans.
NOTED_REQUEST_HEADERS: Final = frozenset({
    b"content-length", b"expect", b"x-request-id", b"x-forwarded-for", b"host", b"connection",
    b"transfer-encoding",
})
# Of those, the ones whose repeated fields make one list (RFC 9110 §5.3).
LISTED_REQUEST_HEADERS: Final = frozenset({b"connection", b"transfer-encoding",
                                           b"x-forwarded-for"})
_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close", b""})


HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""A header name (a token, RFC 9110 §5.1)."""


def header_value_problem(value: str) -> str | None:
    """What makes ``value`` unfit to be written as a header value, or None: a line break
    (it would start another header) or NUL, or a character outside Latin-1."""
    if any(c in value for c in "\r\n\0"):
        return "the value must not contain line breaks or NUL"
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return ("HTTP/1.1 header values are Latin-1 text; encode other characters "
                "(e.g. percent-encoding)")
    return None


def hop_by_hop_problem(name: str) -> str | None:
    """Why a header named ``name`` cannot be set for an upstream (a shadow's
    ``set_headers``, the replay's ``--set-header``), or None: a hop-by-hop header
    (``HOP_BY_HOP``) concerns one connection, so none is ever sent on, whoever gives it."""
    if name.lower().encode("latin-1") in HOP_BY_HOP:
        return (f"{name} is a hop-by-hop header (RFC 9110 §7.6.1: Connection, Keep-Alive, "
                "TE, Trailer, Transfer-Encoding, Upgrade, Proxy-Connection, "
                "Proxy-Authorization): it concerns one connection and is never sent on, "
                "so it cannot be set")
    return None


def lists_extra_tokens(connection: bytes) -> bool:
    """Whether a Connection value names headers (beyond keep-alive/close) to drop as well."""
    return connection.strip().lower() not in _PLAIN_CONNECTION


def _connection_options(headers: Headers) -> set[bytes]:
    """The options of every Connection line, lower-cased (RFC 9110 §7.6.1)."""
    options: set[bytes] = set()
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":
            options.update(option.strip().lower() for option in value.split(b","))
    return options


def keeps_alive(version: str, headers: Headers) -> bool:
    """Whether a message of HTTP ``version`` ("1.1", "1.0") leaves its connection open by its
    Connection header (RFC 9112 §9.3), whatever its framing: for an answer that has no body
    whatever its headers say (to a HEAD), which the parser cannot be told of."""
    options = _connection_options(headers)
    if b"close" in options:
        return False
    return version == "1.1" or (version == "1.0" and b"keep-alive" in options)


# Connection options that name no header to remove: keep-alive and close are the
# connection's own, and Content-Length frames the body relayed with it (a response that lost
# it would have no framing at all, and its client would read the next answer as its body).
_NOT_REMOVED: Final = frozenset({b"keep-alive", b"close", b"content-length"})


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Header names listed in Connection (other than keep-alive/close, and never
    Content-Length): hop-by-hop too."""
    return frozenset(_connection_options(headers) - _NOT_REMOVED - {b""})


def header_value(headers: Headers, lname: bytes) -> bytes | None:
    """The first value of header ``lname`` (lower-case), or None."""
    for name, value in headers:
        if name.lower() == lname:
            return value
    return None


def header_lines(headers: Headers, skip: frozenset[bytes],
                 skip_lengths: frozenset[int] | None = None) -> bytes:
    """``Name: value\r\n`` for every header whose lower-case name is not in ``skip``.
    ``skip_lengths``, the lengths of the names in ``skip``, spares lower-casing the names
    no name in ``skip`` could match."""
    parts: list[bytes] = []
    for name, value in headers:  # one join of the pieces: no bytes made per line
        if (skip_lengths is None or len(name) in skip_lengths) and name.lower() in skip:
            continue
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(CRLF)
    return b"".join(parts)


def request_head(method: bytes, path_query: bytes, lines: bytes) -> bytes:
    """An HTTP/1.1 request head from the request line parts and ready header lines."""
    return method + b" " + path_query + b" HTTP/1.1\r\n" + lines + CRLF


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n" % len(data) + data + CRLF


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def json_error(status: int, message: str, request_id: str | None, *,
               keep_alive: bool, head_only: bool = False) -> bytes:
    """A complete response with a JSON error body, for errors the proxy answers itself;
    for a HEAD request (``head_only``) its head alone, with the length the body would have
    (RFC 9110 §9.3.2: the client reads no body, and would take one for the next answer)."""
    body = json.dumps({"error": message, "status": status,
                       "request_id": request_id}).encode()
    head = [b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status)),
            b"Content-Type: application/json\r\n",
            b"Content-Length: %d\r\n" % len(body)]
    if request_id:
        head.append(b"X-Request-Id: " + request_id.encode("latin-1") + CRLF)
    head.append(b"Connection: keep-alive\r\n" if keep_alive else b"Connection: close\r\n")
    return b"".join(head) + CRLF + (b"" if head_only else body)


class ClosedParser:
    """Stands in for the parser of a closed connection, which never receives data again.

    Parsers refer back to their protocol; swapping them out when a connection ends lets
    reference counting free both at once, instead of leaving the pair to the cyclic GC.
    """

    def feed_data(self, data: bytes) -> None:
        raise httptools.HttpParserError("the connection is closed")


CLOSED_PARSER: Final = ClosedParser()
