"""One recorded row → the request sent: --set-json, --set-header, stored-decoded bodies."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shadowproxy.compare.window import Window
from shadowproxy.errors import UsageError
from shadowproxy.replay.options import ReplayOptions, parse_set_header, parse_set_json
from shadowproxy.replay.outgoing import NO_JSON_BODY, TRUNCATED, Outgoing, RequestBuilder, Skip


def _row(body: bytes, headers: dict[str, str], body_json: str | None = None,
         **extra: Any) -> dict[str, Any]:
    return {"id": None, "request_id": "rid-1", "received_at": None, "method": "POST",
            "path": "/v1/chat", "query": "a=1", "headers": json.dumps(headers), "body": body,
            "body_json": body_json, "body_truncated": False, "client_addr": "10.0.0.1",
            **extra}


def _build(row: dict[str, Any], *, headers: tuple[str, ...] = (),
           json_edits: tuple[str, ...] = ()) -> Outgoing | Skip:
    now = datetime.now(UTC)
    options = ReplayOptions(route="r", url="http://t", name="c",
                            window=Window(now - timedelta(hours=1), now),
                            set_headers=tuple(parse_set_header(h) for h in headers),
                            set_json=tuple(parse_set_json(j) for j in json_edits))
    return RequestBuilder(options, b"target:9000", b"/base").build(row)


def _split(out: Outgoing | Skip) -> tuple[str, dict[str, str], bytes]:
    assert isinstance(out, Outgoing)
    head, *lines = out.head.decode("latin-1").rstrip("\r\n").split("\r\n")
    return head, {k.lower(): v for k, v in (line.split(": ", 1) for line in lines)}, out.body


def test_set_json_sets_nested_fields_and_reads_values_as_json_else_text() -> None:
    """--set-json puts values at paths (created in objects, every element with [*]); a
    value that is JSON goes in as JSON, anything else as a string; key order is kept."""
    body = b'{"model": "gpt", "messages": [{"role": "user"}, {"role": "assistant"}]}'
    out = _build(_row(body, {"content-type": "application/json"}),
                 json_edits=("$.model=v3", "$.params.temperature=0.5",
                             "$.messages[*].name=\"x\"", "$['odd=key']=[1, 2]"))
    line, headers, sent = _split(out)
    assert line == "POST /base/v1/chat?a=1 HTTP/1.1"
    assert json.loads(sent) == {
        "model": "v3", "messages": [{"role": "user", "name": "x"},
                                    {"role": "assistant", "name": "x"}],
        "params": {"temperature": 0.5}, "odd=key": [1, 2]}
    assert list(json.loads(sent)) == ["model", "messages", "params", "odd=key"]
    assert headers["content-length"] == str(len(sent))


def test_set_json_reads_nan_and_infinity_as_text() -> None:
    """NaN and Infinity are not JSON, though Python's reader takes them: as any value that
    is not JSON, they go in as strings (not as floats, which would be written as null)."""
    out = _build(_row(b'{"model": "gpt"}', {"content-type": "application/json"}),
                 json_edits=("$.a=NaN", "$.b=-Infinity", "$.c=1.5"))
    assert json.loads(_split(out)[2]) == {"model": "gpt", "a": "NaN", "b": "-Infinity",
                                          "c": 1.5}


def test_set_json_skips_requests_it_cannot_edit() -> None:
    """No JSON body, or a path the body has no place for: the request is skipped, saying why."""
    assert _build(_row(b"plain text", {}), json_edits=("$.a=1",)) == Skip(NO_JSON_BODY)
    skip = _build(_row(b'{"a": [1]}', {}), json_edits=("$.a.b=1",))
    assert isinstance(skip, Skip) and "--set-json $.a.b" in skip.reason
    truncated = _build(_row(b'{"a": 1}', {}, body_truncated=True))
    assert truncated == Skip(TRUNCATED)


def test_a_compressed_body_is_sent_compressed_and_a_redacted_one_plain() -> None:
    """A gzip body stored as received keeps its Content-Encoding; one the recorder stored
    decoded (JSON fields redacted) goes without it; --set-json on gzip edits the JSON."""
    packed = gzip.compress(b'{"a": 1}')
    _, headers, sent = _split(_build(_row(packed, {"content-encoding": "gzip"})))
    assert headers["content-encoding"] == "gzip" and sent == packed
    redacted = b'{"a": "[redacted]"}'
    _, headers, sent = _split(_build(_row(redacted, {"content-encoding": "gzip"})))
    assert "content-encoding" not in headers and sent == redacted
    _, headers, sent = _split(_build(_row(packed, {"content-encoding": "gzip"}, '{"a": 1}'),
                                     json_edits=("$.b=2",)))
    assert "content-encoding" not in headers and json.loads(sent) == {"a": 1, "b": 2}


def test_set_header_replaces_recorded_and_proxy_headers() -> None:
    """--set-header replaces a recorded header, fills a redacted one, and can set the
    headers the proxy would add (X-Request-Id); the last one given wins."""
    row = _row(b"", {"authorization": "[redacted]", "x-tenant": "a", "cookie": "[redacted]"},
               method="GET")
    _, headers, sent = _split(_build(row, headers=("X-Tenant=b", "Authorization=Bearer t",
                                                   "X-Request-Id=mine", "X-Tenant=c")))
    assert headers["x-tenant"] == "c" and headers["authorization"] == "Bearer t"
    assert headers["x-request-id"] == "mine" and "cookie" not in headers
    assert "content-length" not in headers and sent == b""


@pytest.mark.parametrize("text", ["NoEquals", "Bad Name=1", "X=a\r\nInjected: 1", "Host=x",
                                  "X=caf\u20ac"])
def test_bad_set_header_values_are_usage_errors(text: str) -> None:
    """A header that is not NAME=VALUE, could split the head, is the replay's own, or is
    not Latin-1 is refused before anything is sent."""
    with pytest.raises(UsageError, match="--set-header"):
        parse_set_header(text)
