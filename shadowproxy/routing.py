"""Route matching: compiled once at start-up, then a pure lookup per request.

The longest ``match.path_prefix`` that the request path starts with wins, among the routes
whose ``match.methods`` admit the request's method. Matching works on the raw path bytes,
but for the hex digits of a percent-encoding, whose case carries no meaning (RFC 3986
§6.2.2.1): a prefix ``/caf%C3%A9`` takes ``/caf%c3%a9``, as curl sends it. The request's
Host header or absolute-form URL never selects an upstream.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

_ESCAPE = re.compile(rb"%[0-9A-Fa-f]{2}")


def _upper_escapes(path: bytes) -> bytes:
    """``path`` with the hex digits of its percent-encodings upper-cased (nothing else)."""
    return _ESCAPE.sub(lambda m: m.group().upper(), path)


class Router(Generic[T]):
    """Maps (method, path) to the value of the best route, or None."""

    __slots__ = ("_entries", "_escaped")

    def __init__(self, entries: Sequence[tuple[str, Sequence[str] | None, T]]) -> None:
        """``entries``: (path_prefix, methods or None for all, value) per route."""
        compiled = [
            (_upper_escapes(prefix.encode()),
             None if methods is None else frozenset(m.encode() for m in methods), value)
            for prefix, methods, value in entries
        ]
        # Longest prefix first; a stable sort keeps the config's order among equals.
        compiled.sort(key=lambda e: -len(e[0]))
        self._entries = compiled
        self._escaped = any(b"%" in prefix for prefix, _, _ in compiled)
        """Whether a prefix holds a percent-encoding: only then is a path's normalized."""

    def values(self) -> list[T]:
        """Every route's value, longest prefix first."""
        return [value for _, _, value in self._entries]

    def match(self, method: bytes, path: bytes) -> T | None:
        if self._escaped and b"%" in path:
            path = _upper_escapes(path)  # for the comparison only; the path goes on as sent
        for prefix, methods, value in self._entries:
            if path.startswith(prefix) and (methods is None or method in methods):
                return value
        return None


def split_url(url: bytes) -> tuple[bytes, bytes]:
    """(path, query) of a request's URL (its request-target); absolute-form URLs are
    reduced to their path."""
    if not url.startswith(b"/"):
        # absolute-form ("http://host/p?q") or authority/asterisk form: drop scheme and host;
        # the proxy only ever forwards to configured upstreams.
        scheme_end = url.find(b"://")
        if scheme_end >= 0:
            slash = url.find(b"/", scheme_end + 3)
            query_mark = url.find(b"?", scheme_end + 3)
            if slash < 0 or (0 <= query_mark < slash):
                url = b"/" + (url[query_mark:] if query_mark >= 0 else b"")
            else:
                url = url[slash:]
        else:
            url = b"/" + url.lstrip(b"*")
    # A fragment is the client's own (RFC 9112 §3.2 leaves it out of the request-target):
    # never forwarded nor stored, after the path as after a query.
    fragment = url.find(b"#")
    if fragment >= 0:
        url = url[:fragment]
    path, _, query = url.partition(b"?")
    return path, query
