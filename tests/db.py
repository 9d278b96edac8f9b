"""One-query helpers for tests that look at what the proxy stored."""

from __future__ import annotations

from typing import Any

import asyncpg

from shadowproxy.store.database import connection, fetch


async def fetchrow(url: str, query: str, *args: Any) -> asyncpg.Record:
    """The first row of ``query`` (asserted to exist)."""
    rows = await fetch(url, query, *args)
    assert rows, f"no row for {query!r}"
    return rows[0]


async def fetchval(url: str, query: str, *args: Any) -> Any:
    """The first column of the first row of ``query``."""
    async with connection(url) as conn:
        return await conn.fetchval(query, *args)


async def execute(url: str, query: str, *args: Any) -> str:
    """Run one statement (a test's change to stored records); its status line."""
    async with connection(url) as conn:
        status: str = await conn.execute(query, *args)
        return status


__all__ = ["execute", "fetch", "fetchrow", "fetchval"]
