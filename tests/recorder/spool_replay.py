"""Replaying a data_dir's spool as the next start would: for the spool tests."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from shadowproxy.config import RecordingConfig
from shadowproxy.metrics import Metrics
from shadowproxy.recorder.recorder import Recorder


async def replay_spool(database_url: str, data_dir: Path, config: RecordingConfig,
                       metrics: Metrics, within_s: float = 30) -> None:
    """Start a recorder on ``data_dir``, wait until no spool segment is left, stop it.

    Fails when segments remain after ``within_s`` seconds.
    """
    recorder = Recorder(config, database_url, data_dir, metrics)
    await recorder.start()
    try:
        deadline = time.monotonic() + within_s
        while list((data_dir / "spool").glob("*.spool")) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await recorder.close()
    assert not list((data_dir / "spool").glob("*.spool")), "the spool was not replayed"
