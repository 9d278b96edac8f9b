"""Shared fixtures: a real PostgreSQL for every test that needs one.

The server is the embedded PostgreSQL (started once per session in a temporary folder), or
the one at SHADOWPROXY_TEST_DATABASE_URL. Each test gets a fresh database on it, migrated.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from shadowproxy.app import Proxy, running
from shadowproxy.config import Settings
from shadowproxy.store.embedded import embedded_server
from shadowproxy.store.migrate import migrate


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` instead."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@contextmanager
def reachable_dir(prefix: str) -> Iterator[Path]:
    """A new directory for an embedded PostgreSQL, removed afterwards. Not under pytest's
    tmp_path: that is private to root (0700), and as root the embedded server runs as its
    own system user, which must be able to reach its data directory."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def demo_dir() -> Iterator[Path]:
    """A demo's ``--data-dir`` (not created yet), in a ``reachable_dir``."""
    with reachable_dir("shadowproxy-test-demo-") as parent:
        yield parent / "demo"


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """URL of a real PostgreSQL server (its maintenance database)."""
    external = os.environ.get("SHADOWPROXY_TEST_DATABASE_URL")
    if external:
        yield external
        return
    with reachable_dir("shadowproxy-test-pg-") as data_dir, embedded_server(data_dir) as url:
        yield url


async def _create_database(server_url: str) -> str:
    name = f"sp_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def _drop_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def empty_database_url(pg_server_url: str) -> AsyncIterator[str]:
    """A fresh, empty database on the test server; dropped afterwards."""
    name = await _create_database(pg_server_url)
    yield with_database(pg_server_url, name)
    await _drop_database(pg_server_url, name)


@pytest.fixture
async def database_url(empty_database_url: str) -> str:
    """A fresh database with the shadowproxy schema applied."""
    await migrate(empty_database_url)
    return empty_database_url


@pytest.fixture
def sync_database_url(pg_server_url: str) -> Iterator[str]:
    """Like ``database_url``, for synchronous tests (CLI subprocesses)."""
    name = asyncio.run(_create_database(pg_server_url))
    url = with_database(pg_server_url, name)
    asyncio.run(migrate(url))
    yield url
    asyncio.run(_drop_database(pg_server_url, name))


# --- the proxy, in-process ----------------------------------------------------------------

StartProxy = Callable[..., AbstractAsyncContextManager[Proxy]]


def make_settings(tmp_path: Path, routes: list[dict[str, Any]], **overrides: Any) -> Settings:
    """Settings for a test proxy on free ports, recording to the test database."""
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "data_dir": str(tmp_path / "data"),
        "recording": {"flush_interval_ms": 50},
        "limits": {"shutdown_grace_s": 2},
        "routes": routes,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return Settings.model_validate(data)


@pytest.fixture
def start_proxy(tmp_path: Path, database_url: str) -> StartProxy:
    """``async with start_proxy(routes, **settings) as proxy``: a real proxy on 127.0.0.1."""

    @asynccontextmanager
    async def start(routes: list[dict[str, Any]], *, url: str | None = None,
                    **overrides: Any) -> AsyncIterator[Proxy]:
        settings = make_settings(tmp_path, routes, **overrides)
        async with running(settings, url or database_url) as proxy:
            yield proxy

    return start


def route(primary: str, *shadows: str, name: str = "r", **extra: Any) -> dict[str, Any]:
    """A route dict: ``primary`` URL, shadows named s1, s2, ... at the given URLs."""
    return {"name": name, "primary": {"url": primary, "timeout_s": 5},
            "shadows": [{"name": f"s{i + 1}", "url": u, "timeout_s": 2}
                        for i, u in enumerate(shadows)], **extra}
