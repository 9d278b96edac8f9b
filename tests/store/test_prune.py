"""Retention: prune deletes old requests and their responses, in batches, on real PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from shadowproxy.errors import DatabaseError, UsageError
from shadowproxy.store.prune import parse_age, prune


async def _insert(conn: asyncpg.Connection, age: timedelta, shadows: int = 1) -> uuid.UUID:
    """One request received `age` ago, with a primary response and `shadows` shadow ones."""
    rid = uuid.uuid4()
    await conn.execute(
        "INSERT INTO shadowproxy.requests (id, request_id, route, received_at, method, path) "
        "VALUES ($1, $2, 'r', now() - $3::interval, 'POST', '/predict')", rid, str(rid), age)
    targets = [("primary", "primary")] + [(f"s{i}", "shadow") for i in range(shadows)]
    await conn.executemany(
        "INSERT INTO shadowproxy.responses (request, target, role, status, started_at) "
        "VALUES ($1, $2, $3, 200, now() - $4::interval)",
        [(rid, target, role, age) for target, role in targets])
    return rid


async def _ids(conn: asyncpg.Connection) -> tuple[set[uuid.UUID], set[uuid.UUID]]:
    requests = {r["id"] for r in await conn.fetch("SELECT id FROM shadowproxy.requests")}
    responses = {r["request"]
                 for r in await conn.fetch("SELECT request FROM shadowproxy.responses")}
    return requests, responses


async def test_prune_removes_old_requests_and_their_responses(database_url: str) -> None:
    """Requests older than the age go with all their responses; younger ones stay whole."""
    conn = await asyncpg.connect(database_url)
    try:
        old = [await _insert(conn, timedelta(days=d), shadows=2) for d in (31, 45, 400)]
        young = [await _insert(conn, timedelta(days=d)) for d in (0, 1, 29)]
        result = await prune(database_url, timedelta(days=30))
        requests, responses = await _ids(conn)
    finally:
        await conn.close()
    assert (result.requests, result.responses) == (3, 9)
    assert requests == responses == set(young)
    assert not set(old) & requests


async def test_prune_works_in_batches_until_done(database_url: str) -> None:
    """A batch size smaller than the backlog takes several batches and still removes it all."""
    conn = await asyncpg.connect(database_url)
    try:
        for _ in range(10):
            await _insert(conn, timedelta(hours=2))
        keep = await _insert(conn, timedelta(minutes=5))
        result = await prune(database_url, timedelta(hours=1), batch_size=3)
        requests, responses = await _ids(conn)
    finally:
        await conn.close()
    assert (result.requests, result.responses, result.batches) == (10, 20, 4)
    assert requests == responses == {keep}


async def test_prune_skips_rows_another_transaction_holds(database_url: str) -> None:
    """A request locked by another transaction is skipped, not waited on; the rest go."""
    conn = await asyncpg.connect(database_url)
    locker = await asyncpg.connect(database_url)
    try:
        held = await _insert(conn, timedelta(days=10))
        await _insert(conn, timedelta(days=10))
        tx = locker.transaction()
        await tx.start()
        await locker.execute("SELECT 1 FROM shadowproxy.requests WHERE id = $1 FOR UPDATE", held)
        result = await prune(database_url, timedelta(days=1))
        await tx.rollback()
        requests, _ = await _ids(conn)
    finally:
        await locker.close()
        await conn.close()
    assert result.requests == 1
    assert requests == {held}


async def test_prune_with_nothing_old_removes_nothing(database_url: str) -> None:
    """With no request past the age, prune reports zero and deletes nothing."""
    conn = await asyncpg.connect(database_url)
    try:
        rid = await _insert(conn, timedelta(hours=1))
        result = await prune(database_url, timedelta(days=1))
        requests, _ = await _ids(conn)
    finally:
        await conn.close()
    assert (result.requests, result.responses, result.batches) == (0, 0, 0)
    assert requests == {rid}


async def test_prune_on_an_unmigrated_database_says_to_migrate(empty_database_url: str) -> None:
    """A database without the schema is a DatabaseError that names `shadowproxy migrate`."""
    with pytest.raises(DatabaseError, match="shadowproxy migrate"):
        await prune(empty_database_url, timedelta(days=1))


async def test_prune_refuses_a_batch_size_below_one(database_url: str) -> None:
    """A batch size of 0 is a usage error, not an endless loop."""
    with pytest.raises(UsageError, match="--batch-size"):
        await prune(database_url, timedelta(days=1), batch_size=0)


@pytest.mark.parametrize(("text", "expected"), [
    ("30d", timedelta(days=30)), ("12h", timedelta(hours=12)), ("90m", timedelta(minutes=90)),
    ("45s", timedelta(seconds=45)), ("2w", timedelta(weeks=2)),
])
def test_parse_age_reads_a_number_and_a_unit(text: str, expected: timedelta) -> None:
    """Ages are a whole number followed by s, m, h, d or w."""
    assert parse_age(text) == expected


@pytest.mark.parametrize("text", ["30", "d", "-1d", "0d", "30 days", "1.5d", "30y", ""])
def test_parse_age_refuses_anything_else_with_an_example(text: str) -> None:
    """A malformed or zero age is a UsageError that shows a valid example."""
    with pytest.raises(UsageError, match=r"e\.g\. 30d"):
        parse_age(text)


def _config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"data_dir: {tmp_path / 'data'}\n"
        f"database: {{url: \"{url}\"}}\n"
        "routes:\n"
        "  - name: r\n"
        "    primary: {url: \"http://127.0.0.1:9\"}\n")
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SHADOWPROXY_DATABASE_URL"}
    return subprocess.run([sys.executable, "-m", "shadowproxy", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_prune_command_says_how_many_it_removed(sync_database_url: str, tmp_path: Path) -> None:
    """`shadowproxy prune` exits 0 and prints the number of requests and responses removed."""
    import asyncio

    async def seed() -> None:
        conn = await asyncpg.connect(sync_database_url)
        try:
            for _ in range(3):
                await _insert(conn, timedelta(days=40))
            await _insert(conn, timedelta(days=1))
        finally:
            await conn.close()

    asyncio.run(seed())
    config = _config(tmp_path, sync_database_url)
    proc = _cli("prune", "-c", str(config), "--older-than", "30d", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    assert "pruned 3 requests and 6 responses" in proc.stdout
    again = _cli("prune", "-c", str(config), "--older-than", "30d")
    assert again.returncode == 0, again.stderr
    assert "nothing to prune" in again.stdout


@pytest.mark.parametrize(("args", "expected"), [
    (["--older-than", "30 days"], "e.g. 30d"),
    (["--older-than", "30d", "--batch-size", "0"], "--batch-size: expected 1 or more"),
])
def test_prune_command_with_bad_arguments_exits_2(
        tmp_path: Path, args: list[str], expected: str) -> None:
    """Bad --older-than or --batch-size values exit 2 before touching any database."""
    config = _config(tmp_path, "postgresql://nobody@127.0.0.1:1/none")
    proc = _cli("prune", "-c", str(config), *args)
    assert proc.returncode == 2
    assert expected in proc.stderr
