"""The selection is fixed when the replay starts: requests recorded while it runs, new
traffic or a record arriving late, are not sent, however long the run."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shadowproxy.compare.window import Window
from shadowproxy.config import load_config
from shadowproxy.replay.command import _replay
from shadowproxy.replay.options import ReplayOptions
from shadowproxy.replay.source import RequestStream
from tests.db import fetchval
from tests.replay.helpers import ROUTE, answers, request, store, write_config
from tests.upstreams import model, serve

pytestmark = pytest.mark.timeout(60)


async def test_requests_recorded_during_the_replay_are_not_sent(
        database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A window ending in an hour, and requests recorded all through the replay, as a proxy
    taking traffic records them: the run sends the 30 requests the preflight counted,
    "30/30 handled", and says that the window ends at its start. The stream renews its
    transaction (here after every one-row fetch, as it does every 30 s): it sent each
    request recorded meanwhile too, "71/30", and a request received before the start whose
    record came in late (a slow shadow, the spool)."""
    # What a long replay does every 30 s and every 8 MiB, at every row.
    monkeypatch.setitem(RequestStream.__init__.__kwdefaults__, "renew_after_s", 0.0)
    monkeypatch.setitem(RequestStream.__init__.__kwdefaults__, "read_ahead_bytes", 1)
    base = time.time() - 600
    await store(database_url, [request(i, received_at=base + i) for i in range(30)])
    settings = load_config(write_config(tmp_path, database_url))
    now = datetime.now(UTC)
    options = ReplayOptions(route=ROUTE, url="", name="cand", rate=20.0,
                            window=Window(now - timedelta(hours=1), now + timedelta(hours=1)))

    async def traffic() -> None:
        await asyncio.sleep(0.3)  # the preflight has counted
        # Received before the start, recorded now.
        await store(database_url, [request(999, received_at=time.time() - 5)])
        for i in range(40):
            await store(database_url, [request(1000 + i, received_at=time.time())])
            await asyncio.sleep(0.02)

    async with serve(model("cand")) as target:
        recording = asyncio.create_task(traffic())
        try:
            status = await _replay(settings, settings.route(ROUTE),
                                   replace(options, url=target.url), database_url)
        finally:
            await recording
    out, err = capsys.readouterr()
    assert status == 0, out + err
    assert await fetchval(database_url, "SELECT count(*) FROM shadowproxy.requests") == 71
    assert "30 requests selected" in out and "30 to handle" in out
    end = (now + timedelta(hours=1)).isoformat()
    assert f"the window ends at the start (--to {end} is later)" in out
    assert re.search(r"done in [\d.]+s: 30 sent", out), out
    assert "replay cand: 30/30 handled" in err, err
    assert len(target.seen) == 30 and await answers(database_url) == 30
