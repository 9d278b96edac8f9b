"""Benchmark: the recorder's cost of assembling one streamed chat answer (``streams.assemble``).

    python bench/stream_bench.py                   # 300 events, 2000 repetitions
    python bench/stream_bench.py --events 1000 --repeat 500

The stream is what an OpenAI-compatible server sends for one answer: a role-only chunk,
``--events`` content chunks of one token each (OpenAI's chunk layout, ``usage: null`` in each
as with ``stream_options.include_usage``), a finish chunk, a usage chunk and ``[DONE]``; one
network read per event, as a token-by-token stream arrives. It prints the CPU time per
stream and per event (``time.process_time``, less disturbed by other processes on a shared
machine than the wall time printed beside it) for ``\\n`` and for ``\\r\\n`` line endings,
the best of 5 rounds.
"""

from __future__ import annotations

import argparse
import time

import orjson

from shadowproxy.streams import assemble


def stream(events: int) -> tuple[bytes, list[tuple[int, float]]]:
    """The body of a ``events``-token stream and one arrival per event, 2 ms apart."""
    head = {"id": "chatcmpl-bench0123456789abcdef", "object": "chat.completion.chunk",
            "created": 1700000000, "model": "bench-model", "system_fingerprint": "fp_bench",
            "usage": None}
    words = ("the", " model", " answers", " with", " a", " token", " at", " a", " time", ".")
    chunks = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]}]
    chunks += [{**head, "choices": [{"index": 0, "delta": {"content": words[i % len(words)]},
                                     "logprobs": None, "finish_reason": None}]}
               for i in range(events)]
    chunks.append({**head, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": "stop"}]})
    chunks.append({**head, "choices": [], "usage": {"prompt_tokens": 50,
                                                    "completion_tokens": events,
                                                    "total_tokens": 50 + events}})
    parts = [b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]
    arrivals = []
    offset = 0
    for i, part in enumerate(parts):
        arrivals.append((offset, 100.0 + 0.002 * i))
        offset += len(part)
    return b"".join(parts), arrivals


def measure(body: bytes, arrivals: list[tuple[int, float]], repeat: int
            ) -> tuple[float, float]:
    """Best-of-5 seconds per ``assemble`` call: (CPU time of this process, wall time)."""
    cpu = wall = float("inf")
    for _ in range(5):
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(repeat):
            assemble(body, arrivals, 99.9)
        cpu = min(cpu, (time.process_time() - c0) / repeat)
        wall = min(wall, (time.perf_counter() - t0) / repeat)
    return cpu, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300, help="content chunks per stream")
    parser.add_argument("--repeat", type=int, default=2000, help="calls per round")
    args = parser.parse_args()
    body, arrivals = stream(args.events)
    result = assemble(body, arrivals, 99.9)
    assert result is not None and result[1]["token_chunks"] == args.events
    for name, data in (("LF", body), ("CRLF", body.replace(b"\n", b"\r\n"))):
        if name == "CRLF":  # the offsets move with the longer line endings
            arrivals = [(o + body[:o].count(b"\n"), t) for o, t in arrivals]
        cpu, wall = measure(data, arrivals, args.repeat)
        events = len(arrivals)
        print(f"{name:>4}: {len(data):,} bytes, {events} events: CPU {cpu * 1e6:,.0f} µs per "
              f"stream ({cpu * 1e6 / events:.2f} µs per event), wall {wall * 1e6:,.0f} µs")


if __name__ == "__main__":
    main()
