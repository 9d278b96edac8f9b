"""Streamed model answers: an OpenAI-compatible SSE stream assembled into the non-streamed answer.

Pure functions, no I/O; they run in the recorder, off the client's path. The data path keeps
one pair per network read of a response body: ``(bytes of body received before this read,
time.perf_counter() when it arrived)``, nothing else per read; :func:`assemble` turns the
captured body and those pairs into

- ``body_json``: the answer as the service would have sent it unstreamed (``object:
  "chat.completion"`` with ``choices[].message`` — role, content and any other text field
  joined from the deltas, tool calls joined by their index — ``finish_reason`` and
  ``logprobs`` per choice, ``usage`` when the stream carried it; or ``object:
  "text_completion"`` with ``choices[].text`` for the legacy completions API), so SQL, the
  diff and the report see one shape whether the service streamed or not;
- ``stream``: the timing of the stream (``responses.stream``), see :func:`assemble`.

SSE framing follows the HTML standard's event-stream parsing: ``\\r\\n``, ``\\r`` and ``\\n``
line endings, several ``data:`` lines of one event joined with ``\\n``, ``:`` comment lines and
other fields ignored, an event dispatched at a blank line only (a last event without its
blank line was cut, and is dropped). A stream is OpenAI-compatible when its events are JSON
objects with a ``choices`` list (or ``object: "chat.completion.chunk"``/``"text_completion"``);
anything else (a JSON body, another SSE protocol, non-JSON events) gives ``None`` and is
stored as it is.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from itertools import accumulate, pairwise
from typing import Any

import brotli
import orjson

from shadowproxy.recorder.bodies import MAX_CODINGS, BodyTooLarge, Inflater

Arrival = tuple[int, float]
"""One network read of a response body: (body bytes received before it, perf_counter time)."""

_TOKEN_KEYS = frozenset({"content", "refusal", "reasoning_content", "reasoning"})
"""Delta fields that carry generated text: the first non-empty one is the first token."""
_CHUNK_OBJECTS = frozenset({"chat.completion.chunk", "text_completion"})
_TOP_KEYS = ["id", "created", "model", "system_fingerprint", "service_tier"]
_SSE_START = frozenset(b"d:eir")  # data:, a comment, event:, id:, retry:
_BLANK_LINE = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")
_LINE = re.compile(rb"\r\n|\r|\n")
_FIRST_LINE = re.compile(rb":|(?:data|event|id|retry)(?:[:\r\n]|$)")
"""The first line of an event stream: a comment, or a field the standard names."""
_DONE = b"[DONE]"
_BOM = b"\xef\xbb\xbf"
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
"""A NUL character as orjson writes it: ``\\u0000`` after an even number of backslashes.
After an odd number it is text (an escaped backslash, then ``u0000``), as in an answer
that explains the escape, which jsonb takes."""


class _Choice:
    """What the deltas of one choice index have said so far."""

    __slots__ = ("finish_reason", "function_call", "logprobs", "other", "role", "text",
                 "tool_calls")

    def __init__(self) -> None:
        self.role: str | None = None
        self.text: dict[str, list[str] | None] = {}
        """Text fields by name (content, refusal, ...): pieces, or None while only null came."""
        self.other: dict[str, Any] = {}
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.function_call: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.logprobs: Any = None


def _events(body: bytes) -> tuple[list[tuple[bytes, int]], bool]:
    """The data of each dispatched event with the offset of its last byte; and whether the
    body ends inside an event (cut before the event's blank line)."""
    if body.startswith(_BOM):
        # The standard drops a byte-order mark before the first line: it is no part of the
        # first field's name, and a `data:` line after it is the first event's data.
        events, cut = _framed(body[len(_BOM):])
        return [(data, end + len(_BOM)) for data, end in events], cut
    return _framed(body)


def _framed(body: bytes) -> tuple[list[tuple[bytes, int]], bool]:
    """``_events`` of a body without a byte-order mark."""
    out: list[tuple[bytes, int]] = []
    crs = body.count(b"\r")
    if not crs:
        nl = b"\n"
    elif crs == body.count(b"\r\n") == body.count(b"\n"):
        nl = b"\r\n"
    elif not body.count(b"\n"):
        nl = b"\r"
    else:
        nl = b""  # mixed line endings
    if nl:
        # One line ending throughout (nearly every server): split at the blank lines in C;
        # when every event is a single `data: ` line, as OpenAI-compatible servers send,
        # no event needs a look of its own.
        sep = nl + nl
        step = len(sep)
        segments = body.split(sep)
        tail = segments.pop()
        ends = [end - 1 for end in accumulate(len(seg) + step for seg in segments)]
        if (body.count(nl) == 2 * len(segments) + tail.count(nl)
                and all(seg.startswith(b"data: ") for seg in segments)):
            out = [(seg[6:], end) for seg, end in zip(segments, ends, strict=True)]
        else:
            for seg, end in zip(segments, ends, strict=True):
                data = _data(seg.split(nl))
                if data is not None:
                    out.append((data, end))
    else:
        start = 0
        for m in _BLANK_LINE.finditer(body):
            data = _data(_LINE.split(body[start:m.start()]))
            if data is not None:
                out.append((data, m.end() - 1))
            start = m.end()
        tail = body[start:]
    if not tail.strip(b"\r\n"):
        return out, False
    # Cut before its blank line: by the standard it is never dispatched. A final
    # `data: [DONE]` without the blank line still says the answer ended.
    data = _data(_LINE.split(tail))
    if data == _DONE:
        out.append((data, len(body) - 1))
        return out, False
    return out, True


def _data(lines: list[bytes]) -> bytes | None:
    """The joined ``data`` field of one event's lines, or None when it has none."""
    parts: list[bytes] = []
    for line in lines:
        if line.startswith(b"data"):
            if len(line) == 4:
                parts.append(b"")
            elif line[4:5] == b":":
                parts.append(line[6:] if line[5:6] == b" " else line[5:])
            # "database: x" is a field named "database", not data
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else b"\n".join(parts)


def _join_logprobs(acc: Any, new: Any) -> Any:
    """Chat logprobs ``{"content": [...]}``, legacy ``{"tokens": [...], ...}``: lists extend."""
    if not isinstance(new, dict):
        return acc
    if not isinstance(acc, dict):
        return {k: list(v) if isinstance(v, list) else v for k, v in new.items()}
    for k, v in new.items():
        old = acc.get(k)
        if isinstance(v, list) and isinstance(old, list):
            old.extend(v)
        elif v is not None or k not in acc:
            acc[k] = list(v) if isinstance(v, list) else v
    return acc


def _tool_call_delta(state: _Choice, deltas: Any) -> bool:
    """Fold ``delta.tool_calls``; True when a name or an argument piece arrived."""
    token = False
    if not isinstance(deltas, list):
        return False
    for d in deltas:
        if not isinstance(d, dict):
            continue
        index = d.get("index", len(state.tool_calls))
        call = state.tool_calls.get(index)
        if call is None:
            call = state.tool_calls[index] = {"id": None, "type": None, "name": [], "args": []}
        if d.get("id") and call["id"] is None:
            call["id"] = d["id"]
        if d.get("type") and call["type"] is None:
            call["type"] = d["type"]
        fn = d.get("function")
        if isinstance(fn, dict):
            name = fn.get("name")
            if isinstance(name, str) and name:
                call["name"].append(name)
                token = True
            args = fn.get("arguments")
            if isinstance(args, str) and args:
                call["args"].append(args)
                token = True
    return token


def _fold(choices: dict[int, _Choice], items: list[Any]) -> int:
    """Fold one chunk's ``choices``: 1 if a token arrived, | 2 if a legacy text choice."""
    token = 0
    for c in items:
        if not isinstance(c, dict):
            continue
        index = c.get("index", 0)
        state = choices.get(index)
        if state is None:
            state = choices[index] = _Choice()
        finish = c.get("finish_reason")
        if finish is not None:
            state.finish_reason = finish
        logprobs = c.get("logprobs")
        if logprobs is not None:
            state.logprobs = _join_logprobs(state.logprobs, logprobs)
        delta = c.get("delta")
        if not isinstance(delta, dict):
            text = c.get("text")
            if isinstance(text, str):
                token |= 2
                pieces = state.text.get("text")
                if pieces is None:
                    state.text["text"] = [text]
                else:
                    pieces.append(text)
                if text:
                    token |= 1
            continue
        for key, value in delta.items():
            if key == "content" and value.__class__ is str:
                pieces = state.text.get(key)
                if pieces is None:
                    state.text[key] = [value]
                else:
                    pieces.append(value)
                if value:
                    token |= 1
            elif key == "role":
                if value:
                    state.role = value
            elif key == "tool_calls":
                if _tool_call_delta(state, value):
                    token |= 1
            elif key == "function_call":
                if isinstance(value, dict):
                    fc = state.function_call
                    if fc is None:
                        fc = state.function_call = {"name": [], "args": []}
                    if isinstance(value.get("name"), str) and value["name"]:
                        fc["name"].append(value["name"])
                        token |= 1
                    if isinstance(value.get("arguments"), str) and value["arguments"]:
                        fc["args"].append(value["arguments"])
                        token |= 1
            elif isinstance(value, str):
                pieces = state.text.get(key)
                if pieces is None:
                    state.text[key] = [value]
                else:
                    pieces.append(value)
                if value and key in _TOKEN_KEYS:
                    token |= 1
            elif value is None:
                state.text.setdefault(key, None)
            else:
                state.other[key] = value
    return token


def _message(state: _Choice) -> dict[str, Any]:
    message: dict[str, Any] = {"role": state.role or "assistant", "content": None}
    for key, pieces in state.text.items():
        message[key] = None if pieces is None else "".join(pieces)
    message.update(state.other)
    if state.tool_calls:
        message["tool_calls"] = [
            {"id": call["id"], "type": call["type"] or "function",
             "function": {"name": "".join(call["name"]), "arguments": "".join(call["args"])}}
            for _, call in sorted(state.tool_calls.items())]
    if state.function_call is not None:
        fc = state.function_call
        message["function_call"] = {"name": "".join(fc["name"]),
                                    "arguments": "".join(fc["args"])}
    return message


def _percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    pos = (len(ordered) - 1) * q
    low = int(pos)
    if low + 1 >= len(ordered):
        return ordered[-1]
    return ordered[low] + (ordered[low + 1] - ordered[low]) * (pos - low)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def assemble(body: bytes, arrivals: Sequence[Arrival] = (), sent_at: float | None = None, *,
             head_at: float | None = None, truncated: bool = False, failed: bool = False
             ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(body_json, stream)`` of an OpenAI-compatible SSE body, or None for anything else.

    ``body`` is the captured body without content-encoding (see :func:`decode_arrivals`);
    ``arrivals`` the data path's ``(offset, perf_counter)`` per network read, in order;
    ``sent_at`` the perf_counter time the request was sent and ``head_at`` the one the
    response head arrived (the first read's time stands in for it when not given);
    ``truncated`` that the body was cut at the recording cap, and ``failed`` that the call
    ended in an error (``error_kind`` set): with a truncated body, that alone tells whether
    the stream was interrupted.

    ``stream`` holds ``ttfb_ms`` (request sent → first response byte), ``ttft_ms`` (→ the
    event carrying the first generated text, tool-call name or argument; not the role-only
    first chunk), ``chunks`` (JSON chunk events), ``token_chunks`` (those carrying generated text),
    ``gap_p50_ms``/``gap_p90_ms``/``gap_p99_ms``/``gap_max_ms`` (between consecutive token
    chunks: the inter-token latency the client saw), ``duration_ms`` (request sent → last
    byte), ``interrupted`` (no ``[DONE]``, or cut inside an event: every choice that had not
    finished keeps ``finish_reason: null``), ``completion_tokens`` and ``tokens_per_s``
    (``(completion_tokens − 1)`` over first to last token chunk; both None unless the stream
    sent ``usage``), and ``truncated``/``invalid_events``/``errors`` when there are any. Times are
    None when ``sent_at`` or ``arrivals`` are missing.
    """
    start = body[:1]
    if start in b" \t\r\n\xef":  # (the empty body too) look past a BOM and blank lines
        start = body.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if not start or start[0] not in _SSE_START:
        return None
    events, cut = _events(body)
    choices: dict[int, _Choice] = {}
    top: dict[str, Any] = {}
    pending = _TOP_KEYS
    usage: Any = None
    errors: list[Any] = []
    recognised = False
    legacy = False
    done = False
    invalid = 0
    chunks = 0
    token_ends: list[int] = []
    for data, end in events:
        if data == _DONE:
            done = True
            break
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            if not recognised:
                return None
            invalid += 1
            continue
        if not isinstance(obj, dict):
            if not recognised:
                return None
            invalid += 1
            continue
        items = obj.get("choices")
        if items.__class__ is not list:
            items = None
        if items is None and obj.get("object") not in _CHUNK_OBJECTS:
            # An error event mid-stream: {"error": {...}}, or {"object": "error", ...}.
            if "error" in obj:
                errors.append(obj["error"])
                continue
            if obj.get("object") == "error":
                errors.append(obj)
                continue
            if not recognised:
                return None
            invalid += 1
            continue
        recognised = True
        chunks += 1
        if pending:  # the answer's id, model, ...: the first value that is not null
            waiting = []
            for key in pending:
                value = obj.get(key)
                if value is None or value == "" or value == 0:
                    # Not known yet: null, or the placeholders ("" and 0) of a chunk that
                    # carries no answer, such as Azure OpenAI's first (its prompt's filter
                    # results): kept only if no chunk says more.
                    if key in obj and top.get(key) is None:
                        top[key] = value
                    waiting.append(key)
                else:
                    top[key] = value
            pending = waiting
        u = obj.get("usage")
        if u is not None:
            usage = u
        if items is not None:
            flags = _fold(choices, items)
            if flags & 2:
                legacy = True
            if flags & 1:
                token_ends.append(end)
    if not recognised:
        return None

    answer: dict[str, Any] = {"id": top.get("id"),
                              "object": "text_completion" if legacy else "chat.completion",
                              "created": top.get("created"), "model": top.get("model")}
    for key in ("system_fingerprint", "service_tier"):
        if key in top:
            answer[key] = top[key]
    out_choices = []
    for index, state in sorted(choices.items()):
        if legacy:
            pieces = state.text.get("text")
            out_choices.append({"index": index, "text": "".join(pieces or ()),
                                "logprobs": state.logprobs,
                                "finish_reason": state.finish_reason})
        else:
            out_choices.append({"index": index, "message": _message(state),
                                "logprobs": state.logprobs,
                                "finish_reason": state.finish_reason})
    answer["choices"] = out_choices
    if usage is not None:
        answer["usage"] = usage
    if errors:
        answer["error"] = errors[-1]

    interrupted = (failed and not done) if truncated else (cut or not done)
    stream = _timing(arrivals, sent_at, head_at, token_ends)
    stream["chunks"] = chunks
    stream["token_chunks"] = len(token_ends)
    stream["interrupted"] = interrupted
    first, last = stream.pop("_first_token_s"), stream.pop("_last_token_s")
    completion = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if not isinstance(completion, int) or isinstance(completion, bool):
        completion = None
    stream["completion_tokens"] = completion
    span = (last - first) if first is not None and last is not None else 0.0
    stream["tokens_per_s"] = (round((completion - 1) / span, 3)
                              if completion is not None and completion >= 2 and span > 0
                              else None)
    if truncated:
        stream["truncated"] = True
    if invalid:
        stream["invalid_events"] = invalid
    if errors:
        stream["errors"] = len(errors)
    return answer, stream


def _timing(arrivals: Sequence[Arrival], sent_at: float | None, head_at: float | None,
            token_ends: list[int]) -> dict[str, Any]:
    """Times from the arrivals: each token chunk arrived with the read holding its last byte."""
    none: dict[str, Any] = {"ttfb_ms": None, "ttft_ms": None, "duration_ms": None,
                            "gap_p50_ms": None, "gap_p90_ms": None, "gap_p99_ms": None,
                            "gap_max_ms": None, "_first_token_s": None, "_last_token_s": None}
    if not arrivals:
        return none
    times: list[float] = []
    j = 0
    n = len(arrivals)
    for end in token_ends:
        while j + 1 < n and arrivals[j + 1][0] <= end:
            j += 1
        times.append(arrivals[j][1])
    out = none
    first_byte = head_at if head_at is not None else arrivals[0][1]
    if sent_at is not None:
        out["ttfb_ms"] = _ms(first_byte - sent_at)
        out["duration_ms"] = _ms(arrivals[-1][1] - sent_at)
        if times:
            out["ttft_ms"] = _ms(times[0] - sent_at)
    if times:
        out["_first_token_s"] = times[0]
        out["_last_token_s"] = times[-1]
    if len(times) >= 2:
        gaps = sorted(b - a for a, b in pairwise(times))
        out["gap_p50_ms"] = _ms(_percentile(gaps, 0.5))
        out["gap_p90_ms"] = _ms(_percentile(gaps, 0.9))
        out["gap_p99_ms"] = _ms(_percentile(gaps, 0.99))
        out["gap_max_ms"] = _ms(gaps[-1])
    return out


def looks_like_events(data: bytes) -> bool:
    """True for bytes that begin (after a byte-order mark and blank lines) as an event
    stream does: a comment, or a ``data``, ``event``, ``id`` or ``retry`` field."""
    return _FIRST_LINE.match(data.lstrip(b"\xef\xbb\xbf \t\r\n")) is not None


def decode_arrivals(body: bytes, arrivals: Sequence[Arrival], encoding: bytes, cap: int
                    ) -> tuple[bytes, list[Arrival]] | None:
    """A content-encoded (gzip, deflate, br) body decoded read by read, with its arrivals
    moved to offsets in the decoded bytes; None if the encoding is unknown or corrupt, lists
    more than ``MAX_CODINGS`` codings, or the decoded body would exceed ``cap`` bytes.

    Each read is decoded as it came, so an event gets the time of the read that completed
    it (as far as the server flushed its compressor between events). A list of codings
    (``gzip, br``) is undone last first (RFC 9110, 8.4), each step moving the arrivals on.
    """
    if encoding.find(b",") >= 0:
        if encoding.count(b",") >= MAX_CODINGS:
            return None  # each step walks every arrival: see bodies.MAX_CODINGS
        # The steps before the last share one cap, as in ``bodies.decompress``: a long
        # list must not multiply the work.
        codings = encoding.split(b",")
        step: tuple[bytes, list[Arrival]] = (body, list(arrivals))
        room = cap
        for coding in codings[:0:-1]:
            decoded = decode_arrivals(step[0], step[1], coding, room)
            if decoded is None:
                return None
            if decoded[0] is not step[0]:  # (identity: room never goes below 0)
                room -= len(decoded[0])
            step = decoded
        return decode_arrivals(step[0], step[1], codings[0], cap)
    enc = encoding.strip().lower()
    if enc in (b"", b"identity"):
        return body, list(arrivals)
    d: Any
    if enc in (b"gzip", b"x-gzip", b"deflate"):
        d = Inflater(enc, body)  # every member of a gzip body; nothing after a deflate one
    elif enc == b"br":
        d = brotli.Decompressor()
    else:
        return None
    out: list[bytes] = []
    moved: list[Arrival] = []
    size = 0
    bounds = [a[0] for a in arrivals] + [len(body)]
    try:
        for i, (offset, t) in enumerate(arrivals):
            piece = body[offset:min(bounds[i + 1], len(body))] if offset < len(body) else b""
            moved.append((size, t))
            if not piece:
                continue
            room = cap - size + 1
            if isinstance(d, brotli.Decompressor):
                data = d.process(piece, output_buffer_limit=room)
            else:
                data = d.feed(piece, room - 1)
            size += len(data)
            if size > cap:
                return None
            out.append(data)
    except (zlib.error, brotli.error, BodyTooLarge):
        return None
    return b"".join(out), moved


def body_json_text(answer: dict[str, Any]) -> str | None:
    """The assembled answer as JSON text for the ``body_json`` column; None if PostgreSQL's
    jsonb cannot hold it (a NUL character in a string)."""
    text = orjson.dumps(answer).decode()
    if "\\u0000" in text and _NUL_ESCAPE.search(text) is not None:
        return None
    return text
