"""Connecting to PostgreSQL: the one place that turns asyncpg and socket errors into ours."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from shadowproxy.config import Settings
from shadowproxy.errors import DatabaseError
from shadowproxy.store.embedded import CleanupMode, start_embedded

# What a lost or refused database connection raises, from the socket up to the protocol.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ConnectionError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
)


def database_url(settings: Settings, *, embedded_cleanup: CleanupMode = "stop") -> str:
    """The configured URL, or that of the embedded server (started if needed)."""
    if settings.database.url:
        return settings.database.url
    return start_embedded(settings.data_dir, cleanup=embedded_cleanup)


def describe(url: str) -> str:
    """A URL safe to print: the password is hidden."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


async def connect(url: str, *, timeout: float = 10.0) -> asyncpg.Connection:
    """One connection; DatabaseError says where it tried and why it failed."""
    try:
        return await asyncpg.connect(url, timeout=timeout)
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL at {describe(url)}: {exc}") from exc


@contextlib.asynccontextmanager
async def connection(url: str, *, timeout: float = 10.0) -> AsyncIterator[asyncpg.Connection]:
    """``async with connection(url) as conn``: connect, and always close."""
    conn = await connect(url, timeout=timeout)
    try:
        yield conn
    finally:
        await conn.close()


async def fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """Run one query on a fresh connection (for commands, never for the data path)."""
    async with connection(url) as conn:
        try:
            return list(await conn.fetch(query, *args))
        except asyncpg.PostgresError as exc:
            raise DatabaseError(f"query failed: {exc}") from exc
