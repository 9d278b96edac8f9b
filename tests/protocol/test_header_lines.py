"""``http1.header_lines``: the lines passed on, with and without the lengths of the names
to skip (which only spare lower-casing names that cannot match)."""

from __future__ import annotations

import random

from shadowproxy import http1


def test_lengths_change_nothing_but_the_work() -> None:
    rng = random.Random(11)
    names = [b"Content-Type", b"Content-Length", b"CONNECTION", b"Keep-Alive", b"x-request-id",
             b"X-Request-ID", b"Date", b"Server", b"Transfer-Encoding", b"TE", b"Upgrade",
             b"X-Custom", b"Proxy-Connection"]
    for _ in range(500):
        headers = [(rng.choice(names), b"v%d" % i) for i in range(rng.randrange(8))]
        by_lengths = http1.header_lines(headers, http1.RESPONSE_REWRITTEN,
                                        http1.RESPONSE_REWRITTEN_LENGTHS)
        expected = b"".join(name + b": " + value + b"\r\n" for name, value in headers
                            if name.lower() not in http1.RESPONSE_REWRITTEN)
        assert by_lengths == expected
        assert http1.header_lines(headers, http1.RESPONSE_REWRITTEN) == expected


def test_the_lengths_are_those_of_the_names() -> None:
    assert {len(n) for n in http1.RESPONSE_REWRITTEN} == http1.RESPONSE_REWRITTEN_LENGTHS
