"""A large batch goes to COPY a few rows per turn of the event loop (``YieldingRows``),
every row stored, in order, and the loop serving other work in between."""

from __future__ import annotations

import asyncio

import asyncpg

from shadowproxy.config import RecordingConfig
from shadowproxy.recorder.copyrows import YieldingRows
from shadowproxy.recorder.postgres import PostgresWriter
from shadowproxy.recorder.rows import RowEncoder
from tests.recorder.exchanges import exchanges


async def test_rows_come_in_order_with_a_turn_of_the_loop_every_few() -> None:
    rows = [(i,) for i in range(100)]
    turns = 0
    seen: list[tuple[int, int]] = []  # (row, loop turns taken by others before it)

    async def other_work() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    try:
        start = turns
        async for row in YieldingRows(rows, 8):
            seen.append((row[0], turns - start))
    finally:
        other.cancel()
    assert [row for row, _ in seen] == list(range(100))
    # The other task ran once before rows 7, 15, 23, ... and never in between.
    assert [turn for _, turn in seen] == [(i + 1) // 8 for i in range(100)]


async def test_a_large_batch_is_stored_whole(database_url: str) -> None:
    """300 exchanges (300 request rows, 300 response rows: past the size COPY takes as a
    list) through the writer's COPY path."""
    requests, responses = RowEncoder(RecordingConfig()).encode(exchanges(300))
    assert len(requests) > 128 and len(responses) > 128
    writer = PostgresWriter(database_url)
    try:
        await writer.write(requests, responses)
    finally:
        await writer.close()
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetch("SELECT id FROM shadowproxy.requests ORDER BY id")
        answers = await conn.fetchval("SELECT count(*) FROM shadowproxy.responses")
    finally:
        await conn.close()
    assert sorted(row[0] for row in requests) == [row["id"] for row in stored]
    assert answers == len(responses)
