"""Rows for asyncpg's COPY, handing the event loop back to the data path every few rows.

asyncpg encodes a list of rows in one go: a backlog of thousands after a pause would hold
client requests up for milliseconds. ``YieldingRows`` is the async iterable the writer
gives COPY instead, pausing for one turn of the loop every ``every`` rows. It is compiled
(``build.py``) because it runs once per row: an async generator doing the same in the
interpreter cost about 2,000 instructions a row, a tenth of the rest of its COPY.
"""

from __future__ import annotations

import asyncio

from shadowproxy.recorder.rows import Row


class YieldingRows:
    """``rows`` one at a time, with a turn of the event loop before every ``every``-th."""

    def __init__(self, rows: list[Row], every: int) -> None:
        self.rows = rows
        self.every = every
        self.position = 0

    def __aiter__(self) -> YieldingRows:
        return self

    async def __anext__(self) -> Row:
        i = self.position
        if i >= len(self.rows):
            raise StopAsyncIteration
        self.position = i + 1
        if i % self.every == self.every - 1:
            await asyncio.sleep(0)
        return self.rows[i]
