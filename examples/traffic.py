"""Send prediction requests drawn from the example data set to a local URL, with a progress bar.

    python -m examples.traffic --url http://127.0.0.1:8080/predict --requests 2000

Each request is ``{"features": {...}}`` for one patient of the diabetes data that the models
were not trained on (drawn with a seeded generator, so runs repeat), with a fresh
``X-Request-Id``. ``--labels FILE`` writes ``request_id,label`` rows (the patient's true
outcome) for ``shadowproxy labels import``, so a report can score both models against the
truth. At most ``--concurrency`` requests are in flight at once; ``--rate`` paces them at so
many per second, as traffic arriving from users would be (without it, each worker sends its
next request as soon as the last is answered).

It only sends to this machine (127.0.0.1, ::1, localhost): it is a demo load generator, not a
load-testing tool to point at someone else's service.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import ipaddress
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from examples.dataset import load, row_to_features


class TrafficError(ValueError):
    """The traffic cannot be sent as asked (a bad URL or count); the message says why."""


@dataclass
class TrafficResult:
    """What came back: one status per answered request, and transport failures."""

    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def sent(self) -> int:
        return sum(self.statuses.values()) + sum(self.failures.values())

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    def summary(self) -> str:
        parts = [f"{self.sent} requests in {self.elapsed_s:.1f}s",
                 f"{self.ok} answered 2xx"]
        other = {s: n for s, n in sorted(self.statuses.items()) if not 200 <= s < 300}
        if other:
            parts.append("other statuses " + ", ".join(f"{s}: {n}" for s, n in other.items()))
        if self.failures:
            parts.append("failed " + ", ".join(f"{k}: {n}" for k, n in self.failures.items()))
        if len(self.latencies_ms) >= 2:
            q = statistics.quantiles(self.latencies_ms, n=100)
            parts.append(f"latency p50 {q[49]:.1f} ms, p99 {q[98]:.1f} ms")
        return "; ".join(parts)


def check_url(url: str) -> str:
    """``url`` if it is an http URL on this machine, else TrafficError saying what is allowed."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise TrafficError(f"expected an http:// URL, e.g. http://127.0.0.1:8080/predict "
                           f"(got {url!r})")
    host = parts.hostname
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local:
        raise TrafficError(f"traffic is only sent to this machine (127.0.0.1, ::1, localhost); "
                           f"got host {host!r}")
    return url


Body = dict[str, dict[str, int | float]]


def _requests(count: int, seed: int) -> Iterator[tuple[str, Body, float]]:
    data = load()
    rows = np.random.default_rng(seed).integers(0, len(data.x_test), size=count)
    for i in rows:
        body = {"features": row_to_features(data.x_test[i])}
        yield str(uuid.uuid4()), body, float(data.y_test[i])


def check_load(url: str, count: int, concurrency: int, rate: float | None) -> None:
    """TrafficError unless ``url`` is local and the count, concurrency and rate make sense."""
    check_url(url)
    if count < 1:
        raise TrafficError(f"expected at least 1 request (got {count})")
    if concurrency < 1:
        raise TrafficError(f"expected a concurrency of at least 1 (got {concurrency})")
    if rate is not None and not rate > 0:
        raise TrafficError(f"expected a rate above 0 requests per second (got {rate})")


async def post_all(url: str, requests: Iterator[tuple[str, Any, Any]], *, concurrency: int,
                   rate: float | None, timeout_s: float, labels: Path | None, name: str,
                   on_sent: Callable[[TrafficResult, float], None] | None = None
                   ) -> TrafficResult:
    """POST each (request id, JSON body, label) of ``requests`` to ``url``, at most
    ``concurrency`` at a time and ``rate`` a second, reading each answer to its end;
    ``on_sent(result, seconds since the start)`` after each. The labels of the answered
    requests (those not None) go to ``labels`` as ``request_id,label`` rows."""
    result = TrafficResult()
    pending = enumerate(requests)
    label_rows: list[tuple[str, Any]] = []
    started = time.perf_counter()

    async def worker(session: aiohttp.ClientSession) -> None:
        # Workers share one generator, so no more than `concurrency` requests exist at once.
        for index, (request_id, body, label) in pending:
            if rate is not None:
                # Request i is due i/rate seconds after the start, however long others take.
                delay = started + index / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            t0 = time.perf_counter()
            try:
                async with session.post(url, json=body,
                                        headers={"X-Request-Id": request_id}) as resp:
                    async for _ in resp.content.iter_any():
                        pass
                    result.statuses[resp.status] += 1
            except TimeoutError:
                result.failures["timeout"] += 1
            except aiohttp.ClientError as exc:
                result.failures[type(exc).__name__] += 1
            else:
                result.latencies_ms.append((time.perf_counter() - t0) * 1000)
                if label is not None:
                    label_rows.append((request_id, label))
            if on_sent is not None:
                on_sent(result, time.perf_counter() - started)

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with (aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
                asyncio.TaskGroup() as group):
        for n in range(concurrency):
            group.create_task(worker(session), name=f"{name}-{n}")
    result.elapsed_s = time.perf_counter() - started
    if labels is not None:
        with labels.open("w", newline="", encoding="utf-8") as out:
            writer = csv.writer(out)
            writer.writerow(["request_id", "label"])
            writer.writerows(label_rows)
    return result


async def send(url: str, count: int, *, concurrency: int = 16, rate: float | None = None,
               seed: int = 0, labels: Path | None = None, console: Console | None = None,
               timeout_s: float = 30.0) -> TrafficResult:
    """POST ``count`` requests to ``url``, at most ``concurrency`` at a time, ``rate`` a second."""
    check_load(url, count, concurrency, rate)
    progress = Progress(TextColumn("[bold]sending"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]:>6.0f} req/s"), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console or Console(stderr=True),
                        disable=console is None)
    task = progress.add_task("sending", total=count, rate=0.0)

    def sent(result: TrafficResult, elapsed: float) -> None:
        progress.update(task, advance=1, rate=result.sent / elapsed if elapsed else 0.0)

    with progress:
        return await post_all(url, _requests(count, seed), concurrency=concurrency, rate=rate,
                              timeout_s=timeout_s, labels=labels, name="traffic",
                              on_sent=sent)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.traffic",
        description="Send diabetes-data prediction requests to a local URL.")
    parser.add_argument("--url", default="http://127.0.0.1:8080/predict")
    parser.add_argument("--requests", type=int, default=1000, help="how many to send")
    parser.add_argument("--concurrency", type=int, default=16, help="at most this many at once")
    parser.add_argument("--rate", type=float, help="requests per second (default: as fast as "
                                                   "the answers come)")
    parser.add_argument("--seed", type=int, default=0, help="which patients are drawn")
    parser.add_argument("--labels", type=Path, metavar="FILE",
                        help="write request_id,label rows here (for `shadowproxy labels import`)")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    try:
        result = asyncio.run(send(args.url, args.requests, concurrency=args.concurrency,
                                  rate=args.rate, seed=args.seed, labels=args.labels,
                                  console=console))
    except TrafficError as exc:
        parser.error(str(exc))
    print(result.summary())
    return 0 if result.ok == result.sent else 1


if __name__ == "__main__":
    sys.exit(main())
