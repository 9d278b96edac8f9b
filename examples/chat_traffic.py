"""Send chat-completion requests, streamed and not, to a local OpenAI-compatible URL.

    python -m examples.chat_traffic --url http://127.0.0.1:8080/v1/chat/completions \\
        --requests 500 --stream-share 0.5 --labels labels.csv

The prompts are drawn with a seeded generator (runs repeat) from a few kinds: questions,
weather questions with a ``get_weather`` tool offered (``--weather-share``), long prompts
(``--long-share``, where the example service's "small" model stops early) and questions that
ask for JSON with ``response_format`` (``--json-share``). ``--stream-share`` of the requests
are streamed, with ``stream_options.include_usage`` so that the stream carries token counts.
``--labels FILE`` writes ``request_id,label`` rows for ``shadowproxy labels import``: the
reference answer (the example service's "large" text) of each plain question.

Like ``examples.traffic`` it only sends to this machine (127.0.0.1, ::1, localhost), at most
``--concurrency`` requests at once, ``--rate`` a second if given.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from examples.chat_service import answer_text
from examples.traffic import TrafficError, TrafficResult, check_load, post_all

TOPICS = ("caching", "retries", "load balancing", "feature flags", "rate limits", "schemas",
          "canary releases", "connection pools", "timeouts", "observability", "indexes",
          "batch sizes", "queues", "backpressure", "idempotency", "replication")
QUESTIONS = ("How should I think about {t}?", "What is a common mistake with {t}?",
             "Explain {t} to a new engineer.", "When do {t} matter most?",
             "Give me one tip about {t}.")
CITIES = ("Paris", "Rome", "Oslo", "Lyon", "Berlin", "Madrid", "Lisbon", "Vienna", "Prague",
          "Dublin", "Warsaw", "Athens")
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "unit": {"type": "string",
                                             "enum": ["celsius", "fahrenheit"]}}}}}


@dataclass(frozen=True)
class Mix:
    """Shares of the request kinds and of streamed requests (each from 0 to 1)."""

    stream: float = 0.5
    weather: float = 0.15
    long: float = 0.1
    json: float = 0.1

    def check(self) -> None:
        for name in ("stream", "weather", "long", "json"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise TrafficError(f"--{name}-share: expected 0 to 1 (got {value})")
        if self.weather + self.long + self.json > 1:
            raise TrafficError("--weather-share, --long-share and --json-share add up to more "
                               "than 1")


def requests(count: int, seed: int, mix: Mix, model: str | None
             ) -> Iterator[tuple[str, dict[str, Any], str | None]]:
    """(request id, body, reference answer or None) for ``count`` requests."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        kind = rng.random()
        topic = TOPICS[int(rng.integers(len(TOPICS)))]
        body: dict[str, Any] = {}
        label = None
        if kind < mix.weather:
            prompt = f"What is the weather in {CITIES[int(rng.integers(len(CITIES)))]} today?"
            body["tools"] = [WEATHER_TOOL]
        elif kind < mix.weather + mix.long:
            context = " ".join(TOPICS[int(i)] for i in rng.integers(len(TOPICS), size=30))
            prompt = f"Here are my notes: {context}. Summarise what they say about {topic}."
        elif kind < mix.weather + mix.long + mix.json:
            prompt = f"Answer in JSON: what is the point of {topic}?"
            body["response_format"] = {"type": "json_object"}
        else:
            prompt = QUESTIONS[int(rng.integers(len(QUESTIONS)))].format(t=topic)
            label = answer_text("large", prompt)
        body["messages"] = [{"role": "system", "content": "You are a concise assistant."},
                            {"role": "user", "content": prompt}]
        if model is not None:
            body["model"] = model
        if rng.random() < mix.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        yield str(uuid.uuid4()), body, label


async def send(url: str, count: int, *, mix: Mix | None = None, model: str | None = None,
               concurrency: int = 8, rate: float | None = None, seed: int = 0,
               labels: Path | None = None, timeout_s: float = 60.0) -> TrafficResult:
    """POST ``count`` chat requests to ``url``; streamed answers are read to their end."""
    check_load(url, count, concurrency, rate)
    mix = mix or Mix()
    mix.check()
    return await post_all(url, requests(count, seed, mix, model), concurrency=concurrency,
                          rate=rate, timeout_s=timeout_s, labels=labels, name="chat-traffic")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.chat_traffic",
        description="Send chat-completion requests, streamed and not, to a local URL.")
    parser.add_argument("--url", default="http://127.0.0.1:8080/v1/chat/completions")
    parser.add_argument("--requests", type=int, default=200, help="how many to send")
    parser.add_argument("--model", help="the model to name in each request (default: none)")
    parser.add_argument("--concurrency", type=int, default=8, help="at most this many at once")
    parser.add_argument("--rate", type=float, help="requests per second (default: as fast as "
                                                   "the answers come)")
    parser.add_argument("--seed", type=int, default=0, help="which prompts are drawn")
    parser.add_argument("--stream-share", type=float, default=0.5)
    parser.add_argument("--weather-share", type=float, default=0.15)
    parser.add_argument("--long-share", type=float, default=0.1)
    parser.add_argument("--json-share", type=float, default=0.1)
    parser.add_argument("--labels", type=Path, metavar="FILE",
                        help="write request_id,label rows (reference answers) here")
    args = parser.parse_args(argv)
    mix = Mix(args.stream_share, args.weather_share, args.long_share, args.json_share)
    try:
        result = asyncio.run(send(args.url, args.requests, mix=mix, model=args.model,
                                  concurrency=args.concurrency, rate=args.rate,
                                  seed=args.seed, labels=args.labels))
    except TrafficError as exc:
        parser.error(str(exc))
    print(result.summary())
    return 0 if result.ok == result.sent else 1


if __name__ == "__main__":
    sys.exit(main())
