"""The COPY writer against a real PostgreSQL: fast path, checking path, idempotency."""

from __future__ import annotations

import gc
import random
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from shadowproxy.config import RecordingConfig
from shadowproxy.recorder.pgtime import micros_since_pg_epoch, timestamptz_to_pg
from shadowproxy.recorder.postgres import PostgresWriter
from shadowproxy.recorder.rows import RowEncoder
from tests.recorder.exchanges import exchanges


async def counts(url: str) -> tuple[int, int, int]:
    conn = await asyncpg.connect(url)
    try:
        return (await conn.fetchval("SELECT count(*) FROM shadowproxy.requests"),
                await conn.fetchval("SELECT count(*) FROM shadowproxy.responses"),
                await conn.fetchval("SELECT count(*) FROM shadowproxy.requests "
                                    "WHERE body_json IS NOT NULL"))
    finally:
        await conn.close()


async def test_a_batch_written_twice_is_stored_once(database_url: str) -> None:
    """Writing the same batch again (a replay) adds nothing, by either path, and says so."""
    rows = RowEncoder(RecordingConfig()).encode(exchanges(50))
    writer = PostgresWriter(database_url)
    try:
        await writer.write(*rows)
        assert writer.already_stored == 0
        await writer.write(*rows)
        assert writer.already_stored == 50
        await writer.write(*rows, checked=True)
        assert writer.already_stored == 50
        fresh = RowEncoder(RecordingConfig()).encode(exchanges(5))
        await writer.write(fresh[0] + rows[0][:3], fresh[1] + rows[1][:3])
        assert writer.already_stored == 3
    finally:
        await writer.close()
    assert await counts(database_url) == (55, 55, 55)


async def test_a_value_postgres_refuses_does_not_block_the_batch(database_url: str) -> None:
    """A JSON text PostgreSQL rejects is stored with NULL JSON; the rest of the batch lands."""
    requests, responses = RowEncoder(RecordingConfig()).encode(exchanges(10))
    bad = list(requests[3])
    bad[9] = '{"nul": "\\u0000"}'  # valid for most parsers, refused by jsonb
    requests[3] = tuple(bad)
    writer = PostgresWriter(database_url)
    try:
        await writer.write(requests, responses)
    finally:
        await writer.close()
    assert await counts(database_url) == (10, 10, 9)


async def test_refused_batches_leave_no_reference_cycles(database_url: str) -> None:
    """A batch COPY refuses (a client's malformed JSON) and whose records are then refused one
    by one leaves nothing for the cyclic collector: the proxy runs it once a minute, and a
    minute of such batches, each held in a cycle through its exception's frames, stopped
    the event loop for about a second."""
    writer = PostgresWriter(database_url)
    try:
        await writer.write(*RowEncoder(RecordingConfig()).encode(exchanges(1)))  # connected
        for round_ in range(3):
            requests, responses = RowEncoder(RecordingConfig()).encode(exchanges(20))
            for i in (2, 11):
                bad = list(requests[i])
                bad[9] = '{"nul": "\\u0000"}'  # refused by jsonb, by COPY and by the row
                requests[i] = tuple(bad)
            gc.collect()
            gc.disable()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                await writer.write(requests, responses)
                assert gc.collect() == 0, f"round {round_}: {len(gc.garbage)} objects in cycles"
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()
    finally:
        await writer.close()
    assert (await counts(database_url))[:2] == (61, 61)


async def test_timestamps_are_stored_to_the_microsecond(database_url: str) -> None:
    """Rows carry Unix seconds; the stored timestamptz is that instant (rows spooled by
    earlier versions carry aware datetimes, and store the same)."""
    received = 1_764_148_000.123456
    (ex,) = exchanges(1)
    ex.received_at = received
    ex.responses[0].started_at = received + 0.5
    requests, responses = RowEncoder(RecordingConfig()).encode([ex])
    (old,) = exchanges(1)
    old_req, old_resp = RowEncoder(RecordingConfig()).encode([old])
    as_datetime = datetime.fromtimestamp(received, UTC) - timedelta(days=1)
    old_req[0] = old_req[0][:3] + (as_datetime,) + old_req[0][4:]
    writer = PostgresWriter(database_url)
    try:
        await writer.write(requests, responses)
        await writer.write(old_req, old_resp, checked=True)
    finally:
        await writer.close()
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchval("SELECT received_at FROM shadowproxy.requests WHERE id = $1",
                                     ex.id)
        started = await conn.fetchval("SELECT started_at FROM shadowproxy.responses "
                                      "WHERE request = $1", ex.id)
        stored_old = await conn.fetchval("SELECT received_at FROM shadowproxy.requests "
                                          "WHERE id = $1", old.id)
    finally:
        await conn.close()
    assert stored == datetime(2025, 11, 26, 9, 6, 40, 123456, tzinfo=UTC)
    assert started - stored == timedelta(microseconds=500_000)
    assert stored_old == as_datetime


def test_a_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="naive datetime"):
        timestamptz_to_pg(datetime(2026, 1, 1))


async def test_rows_of_an_old_spool_file_are_stored_with_their_error_kind(
        database_url: str) -> None:
    """Response rows spooled by a version without error kinds are stored with the kind
    their error text names."""
    from shadowproxy.recorder.rows import upgrade_rows

    batch = exchanges(2)
    for ex, (kind, text) in zip(batch, [("timeout", "timeout"),
                                        ("connect", "connect: Connection refused")],
                                strict=True):
        ex.responses[0].status = None
        ex.responses[0].error_kind, ex.responses[0].error = kind, text
    requests, responses = RowEncoder(RecordingConfig()).encode(batch)
    old_layout = [row[:-2] for row in responses]  # what an earlier version spooled
    writer = PostgresWriter(database_url)
    try:
        await writer.write(*upgrade_rows(requests, old_layout), checked=True)
    finally:
        await writer.close()
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT error, error_kind FROM shadowproxy.responses "
                                "ORDER BY error DESC")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [("timeout", "timeout"),
                                        ("connect: Connection refused", "connect")]


@pytest.mark.parametrize("checked", [False, True], ids=["copy", "checking path"])
async def test_a_record_postgres_refuses_anywhere_costs_only_its_own_bodies(
        database_url: str, checked: bool) -> None:
    """A row with a value no path can store (a NUL in a text column, a lone surrogate the
    driver cannot encode) is stored without its bodies and flagged; its batch lands whole,
    by COPY or by the checking path."""
    batch = exchanges(20)
    batch[4].path = "/p\x00nul"
    batch[11].responses[0].error = "closed: \udc80"
    requests, responses = RowEncoder(RecordingConfig()).encode(batch)
    writer = PostgresWriter(database_url)
    try:
        await writer.write(requests, responses, checked=checked)
    finally:
        await writer.close()
    assert await counts(database_url) == (20, 20, 18)
    assert sorted(w.request_id for w in writer.withheld) == sorted(
        [batch[4].request_id, batch[11].request_id])
    assert writer.unstorable == []
    conn = await asyncpg.connect(database_url)
    try:
        bare = await conn.fetch("SELECT q.path, q.body, q.body_truncated, r.error, r.body "
                                "FROM shadowproxy.requests q JOIN shadowproxy.responses r "
                                "ON r.request = q.id WHERE q.body IS NULL ORDER BY q.path")
    finally:
        await conn.close()
    assert [(r["path"], r["body_truncated"], r["body"]) for r in bare] == [
        ("/p", True, None), ("/p\ufffdnul", True, None)]
    assert sorted(r["error"] or "" for r in bare) == ["", "closed: ?"]


def test_timestamps_convert_as_round_does() -> None:
    """The compiled conversion of Unix seconds rounds to the microsecond exactly as
    ``round`` does, ties to even included."""
    rng = random.Random(3)
    base = 946_684_800.0
    values = [base + rng.uniform(-1e9, 2e9) for _ in range(20_000)]
    values += [base + (k + 0.5) / 1e6 for k in range(-50, 50)]  # exact ties
    values += [time.time(), base, 0.0, 1.5, -1.5]
    for value in values:
        assert micros_since_pg_epoch(value) == round((value - base) * 1_000_000), value
        assert timestamptz_to_pg(value) == (round((value - base) * 1_000_000),)
    assert timestamptz_to_pg(int(base) + 2) == (2_000_000,)
    with pytest.raises(TypeError):
        timestamptz_to_pg("2026-01-01")
