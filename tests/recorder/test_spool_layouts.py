"""Spool files written by earlier versions are replayed into today's columns.

Two earlier row layouts may wait in a spool after an upgrade: one from before error kinds
(request rows without ``config_version``, response rows without ``error_kind``) and one from
before configuration versions (request rows without ``config_version`` only).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest

from shadowproxy.config import RecordingConfig
from shadowproxy.metrics import Metrics
from shadowproxy.recorder.recorder import Recorder
from shadowproxy.recorder.rows import REQUEST_COLUMNS, RESPONSE_COLUMNS, RowEncoder
from shadowproxy.recorder.spool import Spool
from tests.recorder.exchanges import exchanges

LAYOUTS = {
    # (request columns, response columns) of rows as each earlier version spooled them
    "before error kinds": (len(REQUEST_COLUMNS) - 1, len(RESPONSE_COLUMNS) - 1),
    "before config versions": (len(REQUEST_COLUMNS) - 1, len(RESPONSE_COLUMNS)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
async def test_a_spool_file_of_an_earlier_layout_is_replayed_whole(
        database_url: str, tmp_path: Path, layout: str) -> None:
    """A recorder that finds a spool segment of an earlier row layout stores every record
    of it: no configuration version, and each failed call's error kind (read from its error
    text where the layout had none)."""
    batch = exchanges(3)
    batch[1].responses[0].status = None
    batch[1].responses[0].error_kind, batch[1].responses[0].error = "timeout", "timeout"
    requests, responses = RowEncoder(RecordingConfig()).encode(batch)
    request_width, response_width = LAYOUTS[layout]
    spool = Spool(tmp_path / "spool", 1 << 20)
    assert spool.append(([r[:request_width] for r in requests],
                         [r[:response_width] for r in responses]))
    spool.close()

    recorder = Recorder(RecordingConfig(), database_url, tmp_path, Metrics(),
                        config_version="0123456789ab")
    await recorder.start()
    try:
        deadline = time.monotonic() + 20
        while list((tmp_path / "spool").glob("*.spool")) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await recorder.close()
    assert not list((tmp_path / "spool").glob("*.spool")), "the segment was not replayed"
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT q.body_json->>'i' AS i, q.config_version, r.status, r.error_kind "
            "FROM shadowproxy.requests q JOIN shadowproxy.responses r ON r.request = q.id "
            "ORDER BY i")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [("0", None, 200, None), ("1", None, None, "timeout"),
                                        ("2", None, 200, None)]
