"""Small finished exchanges for the recorder tests: a JSON request and a primary's answer."""

from __future__ import annotations

import time

from shadowproxy.models import CapturedResponse, Exchange


def exchange(i: int) -> Exchange:
    ex = Exchange("r", time.time(), "POST", "/p", "", [(b"Content-Type", b"application/json")],
                  "127.0.0.1", None)
    ex.body = b'{"i": %d}' % i
    ex.body_size = len(ex.body)
    resp = CapturedResponse("primary", "primary", time.time())
    resp.status, resp.headers, resp.body = 200, [], b'{"prediction": 1}'
    ex.responses.append(resp)
    return ex


def exchanges(n: int) -> list[Exchange]:
    return [exchange(i) for i in range(n)]
