"""Response-only records: the recorder stores a replayed answer on an existing request row."""

from __future__ import annotations

import time
from pathlib import Path

from shadowproxy.config import RecordingConfig
from shadowproxy.metrics import Metrics
from shadowproxy.models import CapturedResponse
from shadowproxy.recorder.recorder import Recorder
from tests.db import fetch, fetchval
from tests.replay.helpers import request, store


async def test_a_response_only_record_adds_its_answer_and_no_request_row(
        database_url: str, tmp_path: Path) -> None:
    """An exchange flagged ``request_stored`` writes its responses under the stored request's
    id and leaves the request row (and its other answers) as they were."""
    recorded = request(1)
    await store(database_url, [recorded])
    again = request(1)
    again.id = recorded.id
    again.request_stored = True
    again.body = b"not stored again"
    answer = CapturedResponse("cand", "replay", time.time())
    answer.status, answer.headers, answer.body = 201, [], b'{"prediction": 7}'
    again.responses = [answer]
    recorder = Recorder(RecordingConfig(flush_interval_ms=20), database_url, tmp_path, Metrics())
    await recorder.start()
    recorder.submit(again)
    await recorder.drained()
    await recorder.close()
    assert await fetchval(database_url, "SELECT count(*) FROM shadowproxy.requests") == 1
    assert await fetchval(database_url, "SELECT body FROM shadowproxy.requests") == \
        recorded.body
    rows = await fetch(database_url, "SELECT target, role, status FROM shadowproxy.responses "
                                     "ORDER BY target")
    assert [tuple(r) for r in rows] == [("cand", "replay", 201), ("primary", "primary", 200)]
