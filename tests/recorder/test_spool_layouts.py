"""Spool files written by earlier versions are replayed into today's columns.

Each earlier row layout may wait in a spool after an upgrade: from before error kinds
(request rows without ``config_version``, response rows without ``error_kind`` and what came
after it), before stream timing (response rows without ``stream``), before partitions
(response rows without their request's ``received_at``), and before configuration versions
(request rows without ``config_version``).
"""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from shadowproxy.config import RecordingConfig
from shadowproxy.metrics import Metrics
from shadowproxy.recorder.rows import REQUEST_COLUMNS, RESPONSE_COLUMNS, RowEncoder
from shadowproxy.recorder.spool import Spool
from tests.recorder.exchanges import exchanges
from tests.recorder.spool_replay import replay_spool

LAYOUTS = {
    # (request columns, response columns) of rows as each earlier version spooled them
    "before error kinds": (len(REQUEST_COLUMNS) - 1, len(RESPONSE_COLUMNS) - 3),
    "before config versions": (len(REQUEST_COLUMNS) - 1, len(RESPONSE_COLUMNS) - 2),
    "before stream timing": (len(REQUEST_COLUMNS), len(RESPONSE_COLUMNS) - 2),
    "before partitions": (len(REQUEST_COLUMNS), len(RESPONSE_COLUMNS) - 1),
}
CONFIG_VERSION = {"before error kinds": None, "before config versions": None,
                  "before stream timing": "0123456789ab", "before partitions": "0123456789ab"}


@pytest.mark.parametrize("layout", list(LAYOUTS))
async def test_a_spool_file_of_an_earlier_layout_is_replayed_whole(
        database_url: str, tmp_path: Path, layout: str) -> None:
    """A recorder that finds a spool segment of an earlier row layout stores every record
    of it: no configuration version, and each failed call's error kind (read from its error
    text where the layout had none)."""
    batch = exchanges(3)
    for ex in batch:
        ex.config_version = "0123456789ab"
    batch[1].responses[0].status = None
    batch[1].responses[0].error_kind, batch[1].responses[0].error = "timeout", "timeout"
    requests, responses = RowEncoder(RecordingConfig()).encode(batch)
    request_width, response_width = LAYOUTS[layout]
    spool = Spool(tmp_path / "spool", 1 << 20)
    assert spool.append(([r[:request_width] for r in requests],
                         [r[:response_width] for r in responses]))
    spool.close()

    await _replay(database_url, tmp_path)
    conn = await asyncpg.connect(database_url)
    try:
        # Joined on received_at too: each response carries its request's, as the recorder's.
        rows = await conn.fetch(
            "SELECT q.body_json->>'i' AS i, q.config_version, r.status, r.error_kind "
            "FROM shadowproxy.requests q JOIN shadowproxy.responses r ON r.request = q.id "
            "AND r.received_at = q.received_at ORDER BY i")
        total = await conn.fetchval("SELECT count(*) FROM shadowproxy.responses")
    finally:
        await conn.close()
    version = CONFIG_VERSION[layout]
    assert [tuple(r) for r in rows] == [("0", version, 200, None),
                                        ("1", version, None, "timeout"),
                                        ("2", version, 200, None)]
    assert total == 3


async def _replay(database_url: str, tmp_path: Path) -> None:
    """Start a recorder on ``tmp_path``, wait until it has replayed the spool, stop it."""
    await replay_spool(database_url, tmp_path, RecordingConfig(), Metrics(), within_s=20)


async def test_a_spooled_replayed_answer_from_before_partitions_gets_its_requests_time(
        database_url: str, tmp_path: Path) -> None:
    """A replayed answer spooled before partitioning has no request row in its batch (the
    request was stored already): it is stored with its request's received_at, looked up,
    in its request's partition."""
    batch = exchanges(2)
    requests, responses = RowEncoder(RecordingConfig()).encode(batch)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO shadowproxy.requests (id, request_id, route, received_at, method, path)"
            " SELECT id, request_id, 'r', to_timestamp(t), 'POST', '/' "
            "FROM unnest($1::uuid[], $2::text[], $3::float8[]) AS x(id, request_id, t)",
            [r[0] for r in requests], [r[1] for r in requests], [r[3] for r in requests])
        answers = [(*r[:2], "replay", *r[3:-1]) for r in responses if r[1] == "primary"]
        spool = Spool(tmp_path / "spool", 1 << 20)
        assert spool.append(([], answers))
        spool.close()
        await _replay(database_url, tmp_path)
        rows = await conn.fetch(
            "SELECT q.tableoid::regclass::text AS q_part, r.tableoid::regclass::text AS r_part "
            "FROM shadowproxy.requests q JOIN shadowproxy.responses r ON r.request = q.id "
            "AND r.received_at = q.received_at AND r.role = 'replay'")
    finally:
        await conn.close()
    assert len(rows) == 2
    for row in rows:
        assert row["q_part"].removeprefix("shadowproxy.requests_") == \
            row["r_part"].removeprefix("shadowproxy.responses_")
        assert row["q_part"] != "shadowproxy.requests_default"


def test_a_spool_directory_an_earlier_version_left_open_is_narrowed(tmp_path: Path) -> None:
    """A spool directory made world-writable before (by a process with umask 000) is made
    the proxy's user's alone when the spool opens, before any segment in it is read."""
    directory = tmp_path / "spool"
    directory.mkdir()
    directory.chmod(0o777)
    spool = Spool(directory, 1 << 20)
    assert spool.append(([], []))
    assert directory.stat().st_mode & 0o777 == 0o700
    assert [s.stat().st_mode & 0o777 for s in directory.glob("*.spool")] == [0o600]
    spool.close()
