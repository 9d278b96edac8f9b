"""Pacing: a fixed --rate holds, --speed keeps the recorded spacing, idle gaps are capped."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
from aiohttp import web

from shadowproxy.replay.pacing import MAX_GAP_S, AsRecorded, FixedRate, Pacer, pacer_for
from tests.replay.helpers import replay, request, store, write_config
from tests.upstreams import Handler, model, serve

pytestmark = pytest.mark.timeout(60)


def _arrivals() -> tuple[list[float], Handler]:
    """A model that notes when each request arrived."""
    times: list[float] = []
    answer = model("c")

    async def timed(req: web.Request) -> web.StreamResponse:
        times.append(time.monotonic())
        return await answer(req)

    return times, timed


async def test_a_fixed_rate_is_held_within_ten_percent(database_url: str,
                                                        tmp_path: Path) -> None:
    """--rate 50 sends 100 requests at 50 a second (measured at the target), within 10%."""
    await store(database_url, [request(i) for i in range(100)])
    config = write_config(tmp_path, database_url)
    times, handler = _arrivals()
    async with serve(handler) as target:
        result = await replay(config, "--rate", "50", to=target.url)
    assert result.status == 0, result.err
    assert len(times) == 100
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 45 <= rate <= 55, rate


async def test_skipped_requests_take_no_place_in_the_rate(database_url: str,
                                                          tmp_path: Path) -> None:
    """Requests that are not sent (bodies truncated at recording) do not slow the others:
    with every other one skipped, --rate 50 still sends at 50 a second."""
    exchanges = [request(i) for i in range(120)]
    for ex in exchanges[::2]:
        ex.body_truncated = True
    await store(database_url, exchanges)
    config = write_config(tmp_path, database_url)
    times, handler = _arrivals()
    async with serve(handler) as target:
        result = await replay(config, "--rate", "50", to=target.url)
    assert result.status == 0, result.err
    assert "skipped   60 (body truncated at recording 60)" in result.out
    assert len(times) == 60
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 45 <= rate <= 55, rate


async def test_speed_keeps_the_recorded_spacing_divided(database_url: str,
                                                        tmp_path: Path) -> None:
    """--speed 2 sends requests recorded 0.3 s apart 0.15 s apart (the span within 10%)."""
    start = time.time() - 120
    await store(database_url, [request(i, received_at=start + 0.3 * i) for i in range(9)])
    config = write_config(tmp_path, database_url)
    times, handler = _arrivals()
    async with serve(handler) as target:
        result = await replay(config, "--speed", "2", to=target.url)
    assert result.status == 0, result.err
    assert "as recorded, 2x" in result.out
    span = times[-1] - times[0]
    assert 1.08 <= span <= 1.32, span  # 8 gaps of 0.15 s
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) > 0.08, gaps


def test_as_recorded_divides_each_gap_and_caps_the_long_ones() -> None:
    """Due times follow the recording divided by the speed; a gap over MAX_GAP_S (after
    dividing) counts as MAX_GAP_S; requests recorded out of order go at once."""
    pacer = AsRecorded(speed=2.0)
    recorded = [100.0, 101.0, 101.0, 100.5, 3_700.0, 3_702.0]
    assert [pacer.due(t) for t in recorded] == [0.0, 0.5, 0.5, 0.5, 0.5 + MAX_GAP_S,
                                                1.5 + MAX_GAP_S]


def test_a_fixed_rate_schedules_request_i_at_i_over_the_rate() -> None:
    """--rate 4: due at 0, 0.25, 0.5, ... whatever the recording says."""
    pacer = FixedRate(4.0)
    assert [pacer.due(t) for t in (9.0, 1.0, 5.0, 5.0)] == [0.0, 0.25, 0.5, 0.75]


def test_without_rate_or_speed_every_request_is_due_at_once() -> None:
    """No --rate and no --speed: as fast as --concurrency allows."""
    pacer = pacer_for(None, None)
    assert type(pacer) is Pacer and pacer.due(5.0) == pacer.due(1.0) == 0.0
    assert isinstance(pacer_for(3.0, None), FixedRate)
    assert isinstance(pacer_for(None, 3.0), AsRecorded)
