"""A recorder that cannot keep up: it says so, and catches up in longer turns.

Past ``queue_max_records`` records are dropped (and counted); the operator reads it in the
log once per episode, written by the writer (the data path never logs), and again with the
count when the queue has room again. While the queue is past
its overflow mark the writer encodes and pickles more records per turn of the loop, so that
on a saturated core it drains the queue faster than requests fill it.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from shadowproxy.config import RecordingConfig
from shadowproxy.metrics import Metrics
from shadowproxy.recorder.recorder import Recorder
from tests.recorder.exchanges import exchange, exchanges
from tests.recorder.slow_database import stored


def warnings_about_the_queue(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "recorder's queue" in r.getMessage()]


async def test_a_full_queue_is_logged_once_per_episode_with_its_count(
        database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="shadowproxy.recorder")
    metrics = Metrics()
    config = RecordingConfig(queue_max_records=100, write_after_records=10)
    recorder = Recorder(config, database_url, tmp_path, metrics)
    await recorder.start()
    try:
        for episode in (1, 2):
            for i in range(150):  # no await: the writer gets no turn in between
                recorder.submit(exchange(i))
            assert metrics.records["dropped"] == 50 * episode
            await recorder.drained()
            said = warnings_about_the_queue(caplog)
            assert len(said) == 2 * episode
            assert said[-2].startswith("the recorder's queue is full")
            assert said[-1] == ("the recorder's queue has room again; 50 records were "
                                "dropped while it was full")
    finally:
        await recorder.close()
    assert metrics.records["written"] == 200
    assert await stored(database_url) == (200, 200)


class Turns:
    """Counts the turns of the event loop other tasks get while it runs."""

    def __init__(self) -> None:
        self.count = 0
        self._done = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Turns:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0)
        self.count = 0
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._done = True
        assert self._task is not None
        await self._task

    async def _tick(self) -> None:
        while not self._done:
            self.count += 1
            await asyncio.sleep(0)


class InlineExecutor(ThreadPoolExecutor):
    """Runs what is submitted at once, in the loop's thread: the spool's write then takes
    no turns of its own, and the turns counted are the writer's alone."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        future: Future[object] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


async def test_behind_the_writer_encodes_and_spools_in_longer_turns(
        database_url: str, tmp_path: Path) -> None:
    asyncio.get_running_loop().set_default_executor(InlineExecutor())
    config = RecordingConfig(queue_max_records=10_000, batch_max_records=1000)
    recorder = Recorder(config, database_url, tmp_path, Metrics())  # writer not started
    recorder._replaying = True  # no replay task: its turns would be counted with the writer's
    batch = exchanges(512)

    async def encode_and_spool() -> tuple[int, int]:
        async with Turns() as turns:
            rows = await recorder._encode(batch)
            encoded = turns.count
            await recorder._spool(*rows, durable=False)
        return encoded, turns.count - encoded

    keeping_up = await encode_and_spool()
    for ex in exchanges(5000):  # past the overflow mark (half the queue's bound)
        recorder.submit(ex)
    behind = await encode_and_spool()
    # 512 records: 16 slices of 32 and 8 frames of 64 while the writer keeps up (and a turn
    # or two for the spool's write), a quarter of the slices' and frames' turns behind.
    assert keeping_up[0] == 16 and behind[0] == 4
    assert keeping_up[1] - behind[1] == 8 - 2
    recorder.spool.close()
