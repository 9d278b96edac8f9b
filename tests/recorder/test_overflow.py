"""A database slower than the traffic: the overflow goes to the spool, and nothing is lost.

The database is a real PostgreSQL made slow for real (``slow_database``): it takes at most
one batch per 200 ms.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from shadowproxy.config import RecordingConfig
from shadowproxy.metrics import Metrics
from shadowproxy.recorder.postgres import PostgresWriter
from shadowproxy.recorder.recorder import Recorder
from shadowproxy.recorder.rows import Row
from tests.recorder.exchanges import exchange
from tests.recorder.slow_database import slow_down_inserts, speed_up_inserts, stored
from tests.recorder.spool_replay import replay_spool


async def test_a_slow_database_gets_every_record_through_the_spool(
        database_url: str, tmp_path: Path) -> None:
    """Offered about 20k records/s, a database that takes at most 5k/s keeps taking batches
    directly while only the excess is spooled, and afterwards holds every record once."""
    await slow_down_inserts(database_url)
    metrics = Metrics()
    config = RecordingConfig(queue_max_records=10_000, batch_max_records=1000,
                             write_after_records=50, flush_interval_ms=20)
    recorder = Recorder(config, database_url, tmp_path, metrics, stop_grace_s=60)
    await recorder.start()
    total, written_before_overflow = 24_000, None
    try:
        for start in range(0, total, 100):
            for i in range(start, start + 100):
                recorder.submit(exchange(i))
            if written_before_overflow is None and recorder.overflowing:
                written_before_overflow = metrics.records["written"]
                # Behind, not down: /readyz stays ready and says so.
                assert recorder.database_ok
            await asyncio.sleep(0.005)
    finally:
        await recorder.close()
    assert written_before_overflow is not None, "the recorder never noticed the database lag"
    assert metrics.records["dropped"] == 0
    assert metrics.records["spooled"] > 0
    assert metrics.records["written"] == total
    # Every record went in either directly or through the spool. The live writes went on
    # while the database was behind: far more than the one batch in flight at the moment
    # the queue reached its mark went in directly (200 ms a batch: about 5 a second).
    direct_while_behind = total - metrics.records["spooled"] - written_before_overflow
    assert direct_while_behind >= 3 * config.batch_max_records, (
        written_before_overflow, metrics.records["spooled"])
    requests, answers = await stored(database_url)
    assert requests == answers == total
    assert not list((tmp_path / "spool").glob("*.spool")), "the spool was left behind"


async def test_a_stop_gives_a_slow_database_its_grace_and_spools_the_rest(
        database_url: str, tmp_path: Path) -> None:
    """A queue the database would need about 20 s to take (100 batches of 20 at 200 ms
    each) is not waited for: the stop ends within its grace and a batch, every record in
    the database or the spool, and the next start stores the spooled ones exactly once."""
    await slow_down_inserts(database_url)
    metrics = Metrics()
    config = RecordingConfig(batch_max_records=20, write_after_records=20, flush_interval_ms=20)
    recorder = Recorder(config, database_url, tmp_path, metrics, stop_grace_s=1.0)
    await recorder.start()
    total = 2_000
    for i in range(total):
        recorder.submit(exchange(i))
    started = time.monotonic()
    await recorder.close()
    took = time.monotonic() - started
    assert took < 3.0, f"the stop took {took:.1f}s with a grace of 1s"
    records = metrics.records
    assert records["dropped"] == 0
    assert records["written"] + records["spooled"] >= total  # replayed ones count twice
    assert records["spooled"] > total // 2
    assert list((tmp_path / "spool").glob("*.spool")), "nothing was left for the next start"

    await _next_start_stores_the_rest(database_url, tmp_path, config, total)


async def _next_start_stores_the_rest(database_url: str, data_dir: Path,
                                      config: RecordingConfig, total: int) -> None:
    """With the database at its speed again, a start on ``data_dir`` stores what the stop
    spooled, and the database then holds each of the ``total`` records once."""
    await speed_up_inserts(database_url)
    await replay_spool(database_url, data_dir, config, Metrics())
    requests, answers = await stored(database_url)
    assert requests == answers == total


class _FinishingWriter(PostgresWriter):
    """A writer that finishes a write it is cancelled in the middle of, and swallows the
    cancellation: what ``asyncio.wait_for`` of Python 3.11 does when the awaited write ends
    in the same turn as the cancellation (fixed in 3.12)."""

    async def write(self, requests: list[Row], responses: list[Row], *,
                    checked: bool = False) -> None:
        inner = asyncio.ensure_future(super().write(requests, responses, checked=checked))
        try:
            await asyncio.shield(inner)
        except asyncio.CancelledError:
            await inner


async def test_a_stop_ends_the_replay_at_its_grace_even_if_the_cancellation_is_lost(
        database_url: str, tmp_path: Path) -> None:
    """A spool the database would need about 20 s for (batches of 20 at 200 ms each): a stop
    with a grace of 1 s ends within the grace and a batch, even when the replay's write
    swallows the stop's cancellation; the next start stores the rest exactly once."""
    await slow_down_inserts(database_url)
    config = RecordingConfig(batch_max_records=20, write_after_records=20, flush_interval_ms=20)
    first = Recorder(config, database_url, tmp_path, Metrics(), stop_grace_s=0.2)
    await first.start()
    total = 2_000
    for i in range(total):
        first.submit(exchange(i))
    await first.close()
    spooled = list((tmp_path / "spool").glob("*.spool"))
    assert spooled, "the first stop spooled nothing: nothing for the replay to do"

    metrics = Metrics()
    recorder = Recorder(config, database_url, tmp_path, metrics, stop_grace_s=1.0)
    recorder.writer = _FinishingWriter(database_url)
    await recorder.start()
    await asyncio.sleep(0.3)  # the replay is under way
    started = time.monotonic()
    await recorder.close()
    took = time.monotonic() - started
    assert took < 2.5, f"the stop took {took:.1f}s with a grace of 1s"
    assert 0 < metrics.records["written"] < total
    assert list((tmp_path / "spool").glob("*.spool")), "nothing was left for the next start"

    await _next_start_stores_the_rest(database_url, tmp_path, config, total)
