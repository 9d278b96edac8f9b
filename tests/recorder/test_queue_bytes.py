"""The recorder's queue is bounded by the bytes it holds, not only by its record count.

Large bodies (images, embeddings) make a few thousand records weigh gigabytes; the byte
bound keeps the queue's memory to ``queue_max_bytes``, spooling the excess when the database
is behind and dropping (and counting) past the bound.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from shadowproxy.config import RecordingConfig
from shadowproxy.metrics import Metrics
from shadowproxy.models import Exchange
from shadowproxy.recorder import spool as spool_module
from shadowproxy.recorder.recorder import Recorder
from tests.recorder.exchanges import exchange
from tests.recorder.slow_database import slow_down_inserts, stored


def large(i: int, body_bytes: int) -> Exchange:
    ex = exchange(i)
    ex.body = b'{"v": "' + b"x" * (body_bytes - 9) + b'"}'
    ex.body_size = len(ex.body)
    return ex


async def test_past_queue_max_bytes_records_are_dropped_and_counted(
        database_url: str, tmp_path: Path) -> None:
    metrics = Metrics()
    config = RecordingConfig(queue_max_records=1000, queue_max_bytes=20_000)
    recorder = Recorder(config, database_url, tmp_path, metrics)  # writer not started
    size = len(large(0, 4096).body) + len(b'{"prediction": 1}')
    for i in range(10):
        recorder.submit(large(i, 4096))
    assert len(recorder.queue) == 20_000 // size
    assert metrics.records["dropped"] == 10 - 20_000 // size
    # One exchange larger than the whole bound is still taken when the queue is empty.
    alone = Recorder(config, database_url, tmp_path / "b", Metrics())
    alone.submit(large(0, 50_000))
    assert len(alone.queue) == 1


async def test_a_slow_database_with_large_bodies_spools_the_excess_by_bytes(
        database_url: str, tmp_path: Path) -> None:
    """The record count never nears its mark here: only the byte bound can tell that the
    database is behind. (The bound holds 200 ms of this traffic, of which the writer has
    the second half to act in once the mark is reached: room for a busy machine.)"""
    await slow_down_inserts(database_url)
    metrics = Metrics()
    body = 10_240
    config = RecordingConfig(queue_max_records=100_000, queue_max_bytes=4_000_000,
                             batch_max_records=1000, write_after_records=20,
                             flush_interval_ms=20)
    recorder = Recorder(config, database_url, tmp_path, metrics, stop_grace_s=60)
    await recorder.start()
    total, overflowed, most_queued = 1000, False, 0
    try:
        for start in range(0, total, 20):  # about 20 MB/s of bodies
            for i in range(start, start + 20):
                recorder.submit(large(i, body))
            overflowed = overflowed or recorder.overflowing
            most_queued = max(most_queued, len(recorder.queue))
            await asyncio.sleep(0.01)
    finally:
        await recorder.close()
    assert overflowed, "the recorder never noticed that the database was behind"
    assert most_queued * body <= config.queue_max_bytes
    assert metrics.records["dropped"] == 0
    assert metrics.records["written"] == total
    requests, _ = await stored(database_url)
    assert requests == total


def slow_fsync(monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[int]:
    """Make every fsync of the spool take ``seconds`` (a busy disk); return the calls' log."""
    calls: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        time.sleep(seconds)
        real(fd)

    monkeypatch.setattr(spool_module.os, "fsync", fsync)
    return calls


async def test_a_slow_disk_does_not_make_a_slow_database_drop_records(
        database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every fsync taking 300 ms (a busy disk), the excess of a database that is only
    behind still goes to the spool as fast as it comes, and no record is dropped: while the
    database is up, the spool stands in for memory and does not wait for the disk."""
    await slow_down_inserts(database_url)
    fsyncs = slow_fsync(monkeypatch, 0.3)
    metrics = Metrics()
    body = 10_240
    config = RecordingConfig(queue_max_records=100_000, queue_max_bytes=4_000_000,
                             batch_max_records=1000, write_after_records=20,
                             flush_interval_ms=20)
    recorder = Recorder(config, database_url, tmp_path, metrics, stop_grace_s=60)
    await recorder.start()
    total = 600
    try:
        for start in range(0, total, 20):  # about 20 MB/s of bodies, 4 MB of queue
            for i in range(start, start + 20):
                recorder.submit(large(i, body))
            await asyncio.sleep(0.01)
    finally:
        await recorder.close()
    assert metrics.records["spooled"] > 0
    assert metrics.records["dropped"] == 0
    assert metrics.records["written"] == total
    assert (await stored(database_url))[0] == total
    assert fsyncs == []


async def test_while_the_database_is_down_each_spooled_batch_is_fsynced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An outage's spool is what survives a power cut: every batch appended while the
    database cannot be reached waits for its fsync."""
    fsyncs = slow_fsync(monkeypatch, 0.0)
    metrics = Metrics()
    config = RecordingConfig(write_after_records=10, flush_interval_ms=20)
    unreachable = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"
    recorder = Recorder(config, unreachable, tmp_path, metrics)
    await recorder.start()
    try:
        for i in range(60):
            recorder.submit(large(i, 1000))
            if i % 10 == 9:
                await recorder.drained()
    finally:
        await recorder.close()
    assert metrics.records["spooled"] == 60
    assert len(fsyncs) >= 6


async def test_a_streamed_answers_noted_arrivals_count_toward_queue_max_bytes(
        database_url: str, tmp_path: Path) -> None:
    """A stream of many tiny pieces holds more in its noted arrivals than in its body:
    they count toward the byte bound too, so such records cannot pile up past it."""
    from shadowproxy.models import StreamArrivals

    def tiny_pieces(i: int) -> Exchange:
        ex = exchange(i)
        answer = ex.responses[0]
        answer.stream = StreamArrivals(0.0, 0.0)
        answer.stream.arrivals = [(n, 0.0) for n in range(1000)]  # 1 byte a piece
        answer.body = b"x" * 1000
        return ex

    recorder = Recorder(RecordingConfig(queue_max_bytes=50_000), database_url, tmp_path,
                        Metrics())  # writer not started
    for i in range(5):
        recorder.submit(tiny_pieces(i))
    assert len(recorder.queue) < 5  # bodies alone (about 1 kB each) would all fit


def heavy_head(i: int, head_bytes: int) -> Exchange:
    """A request without a body whose head is ``head_bytes`` of the smallest headers a
    client can send (as the proxy keeps them: a tuple of two bytes objects each)."""
    ex = exchange(i)
    ex.body, ex.body_size = b"", 0
    ex.headers = [(b"h%d" % n, b"v") for n in range(head_bytes // 10)]
    return ex


async def test_request_heads_count_toward_queue_max_bytes(
        database_url: str, tmp_path: Path) -> None:
    """A client's head of up to limits.max_header_bytes (64 KiB) of tiny headers holds ten
    times that in memory, and no body: counted by their bodies alone, 50,000 such records
    (queue_max_records) were let into the queue, tens of gigabytes for a 128 MiB bound. The
    memory such records hold stays within queue_max_bytes."""
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        one = heavy_head(0, 60_000)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held > 500_000  # what the proxy holds for such a head
    config = RecordingConfig(queue_max_records=50_000, queue_max_bytes=5_000_000)
    metrics = Metrics()
    recorder = Recorder(config, database_url, tmp_path, metrics)  # writer not started
    recorder.submit(one)
    for i in range(1, 100):
        recorder.submit(heavy_head(i, 60_000))
    assert len(recorder.queue) * held <= config.queue_max_bytes
    assert metrics.records["dropped"] == 100 - len(recorder.queue)
