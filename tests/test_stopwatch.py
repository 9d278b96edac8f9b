"""A stop that outlives twice its grace logs where it waits (shadowproxy/stopwatch.py)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from shadowproxy import stopwatch


async def test_a_stop_past_twice_its_grace_logs_the_tasks_it_waits_on(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stopwatch, "SLACK_S", 0.1)
    never = asyncio.Event()

    async def waiting_on_a_silent_peer() -> None:
        await never.wait()

    stuck = asyncio.create_task(waiting_on_a_silent_peer(), name="stuck-close")
    caplog.set_level(logging.WARNING, logger="shadowproxy")
    handle = stopwatch.watch_stop(0.1)
    await asyncio.sleep(0.2)
    assert not caplog.records  # within twice the grace and the slack: nothing said
    await asyncio.sleep(0.3)
    handle.cancel()
    stuck.cancel()
    [record] = caplog.records
    text = record.getMessage()
    assert text.startswith("the stop is still going 0.")
    assert "past twice limits.shutdown_grace_s (0.1 s) and 0.1 s" in text
    assert "stuck-close" in text and "waiting_on_a_silent_peer" in text
    assert "await never.wait()" in text


async def test_a_stop_that_ends_in_time_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="shadowproxy")
    handle = stopwatch.watch_stop(0.05)
    await asyncio.sleep(0.05)
    handle.cancel()
    await asyncio.sleep(1.3)
    assert not caplog.records
