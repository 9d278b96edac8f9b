"""The example traffic generator: bounded concurrency, labels, local targets only."""

from __future__ import annotations

import asyncio
import csv
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from examples.dataset import FEATURES
from examples.traffic import TrafficError, check_url, send


class Recorder:
    """A slow upstream that remembers what it got and how many requests overlapped."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.request_ids: list[str] = []
        self.bodies: list[dict[str, dict[str, int | float]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self.bodies.append(await request.json())
            self.request_ids.append(request.headers["X-Request-Id"])
            status = 503 if len(self.bodies) % 10 == 0 else 200
            await asyncio.sleep(0.01)
            return web.json_response({"prediction": 1.0}, status=status)
        finally:
            self.in_flight -= 1


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, Recorder]]:
    recorder = Recorder()
    app = web.Application()
    app.router.add_post("/predict", recorder.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/predict", recorder
    finally:
        await runner.cleanup()


async def test_sends_n_requests_with_bounded_concurrency(
        upstream: tuple[str, Recorder], tmp_path: Path) -> None:
    """All N requests arrive, never more than `concurrency` at once, each with its own id."""
    url, recorder = upstream
    result = await send(url, 60, concurrency=4, labels=tmp_path / "labels.csv")
    assert result.sent == 60
    assert result.statuses == {200: 54, 503: 6}
    assert 1 < recorder.max_in_flight <= 4
    assert len(set(recorder.request_ids)) == 60
    assert all(set(body["features"]) == set(FEATURES) for body in recorder.bodies)
    with (tmp_path / "labels.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["request_id"] for r in rows} == set(recorder.request_ids)
    assert all(float(r["label"]) > 0 for r in rows)
    assert "503: 6" in result.summary()


async def test_rate_paces_the_requests(upstream: tuple[str, Recorder]) -> None:
    """With --rate 100, 21 requests take at least the 0.2 s their schedule spans."""
    url, _ = upstream
    t0 = time.perf_counter()
    result = await send(url, 21, concurrency=8, rate=100)
    assert result.sent == 21
    assert time.perf_counter() - t0 >= 0.2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"count": 0}, "at least 1 request"),
    ({"concurrency": 0}, "concurrency of at least 1"),
    ({"rate": 0.0}, "rate above 0"),
])
async def test_bad_counts_are_refused(kwargs: dict[str, Any], message: str) -> None:
    """A zero count, concurrency or rate is refused before anything is sent."""
    args: dict[str, Any] = {"count": 5, **kwargs}
    with pytest.raises(TrafficError, match=message):
        await send("http://127.0.0.1:1/predict", **args)


async def test_same_seed_sends_the_same_patients(upstream: tuple[str, Recorder]) -> None:
    """Two runs with one seed send the same bodies in the same order."""
    url, recorder = upstream
    await send(url, 5, concurrency=1, seed=3)
    await send(url, 5, concurrency=1, seed=3)
    assert recorder.bodies[:5] == recorder.bodies[5:]


async def test_unreachable_target_is_counted_not_raised() -> None:
    """A refused connection is counted as a failure; the run still ends."""
    result = await send("http://127.0.0.1:1/predict", 3, concurrency=2)
    assert result.sent == 3
    assert result.ok == 0
    assert sum(result.failures.values()) == 3


@pytest.mark.parametrize("url", ["http://10.1.2.3:8080/", "https://127.0.0.1/", "127.0.0.1:80",
                                 "http://example.com/predict"])
def test_only_local_http_urls_are_accepted(url: str) -> None:
    """Anything but plain http to this machine is refused with the allowed hosts named."""
    with pytest.raises(TrafficError, match=r"127\.0\.0\.1"):
        check_url(url)


def test_local_urls_are_accepted() -> None:
    """127.0.0.1, ::1 and localhost are this machine."""
    for url in ("http://127.0.0.1:8080/predict", "http://[::1]:8080/", "http://localhost/"):
        assert check_url(url) == url
