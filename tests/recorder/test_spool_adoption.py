"""Spool segments of a process that stops while another runs on the same data_dir.

The workers of a supervisor that was killed drain their queues into the spool while the
next supervisor's workers start, and a ``shadowproxy replay`` leaves its own segments: a
running recorder takes them over within ``ADOPT_EVERY_S`` and stores them. They were
adopted at start-up only, and waited in the spool until the next restart.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from shadowproxy.config import RecordingConfig
from shadowproxy.metrics import Metrics
from shadowproxy.recorder import recorder as recorder_module
from shadowproxy.recorder.recorder import Recorder
from shadowproxy.recorder.rows import RowEncoder
from shadowproxy.recorder.spool import Spool, frame_bytes
from tests.recorder.exchanges import exchanges


async def test_the_segments_of_a_process_that_stops_later_are_stored(
        database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(recorder_module, "ADOPT_EVERY_S", 0.1, raising=False)
    caplog.set_level(logging.INFO, logger="shadowproxy.recorder")
    spool_dir = tmp_path / "spool"
    Spool(spool_dir, 1 << 20)  # (the directory, as a recorder makes it)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        segment = spool_dir / f"seg-{other.pid}-1.spool"
        segment.write_bytes(frame_bytes(RowEncoder(RecordingConfig()).encode(exchanges(5))))
        recorder = Recorder(RecordingConfig(), database_url, tmp_path, Metrics())
        await recorder.start()
        try:
            await asyncio.sleep(0.5)
            assert segment.exists()  # its process runs: not this recorder's to store
            other.kill()
            other.wait()
            for _ in range(100):
                if not list(spool_dir.glob("*.spool")):
                    break
                await asyncio.sleep(0.05)
        finally:
            await recorder.close()
    finally:
        other.kill()
        other.wait()
    assert not list(spool_dir.glob("*.spool")), "the segment was not taken over"
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM shadowproxy.requests") == 5
    finally:
        await conn.close()
    assert any("took over 1 spool segments of processes that have stopped" in r.getMessage()
               for r in caplog.records)
