"""Commands behind a lock that another session holds: each waits at most
``database.LOCK_TIMEOUT_S`` for it, then fails saying what holds it up and what to do; they
waited without end and without a word. The lock is held by a real second session."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest

from shadowproxy.cli import main
from shadowproxy.store import database
from shadowproxy.store.migrate import _LOCK_KEY
from shadowproxy.store.partitions import MAINTENANCE_LOCK

WAIT_S = 1.0

LOCKED = ("canceling statement due to lock timeout: another session held a lock on the "
          "shadowproxy tables that this needed longer than a command waits for one (1 s; ")


@pytest.fixture(autouse=True)
def short_lock_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(database, "LOCK_TIMEOUT_S", WAIT_S)


@asynccontextmanager
async def holding(url: str, sql: str) -> AsyncIterator[int]:
    """Another session, in an open transaction that has run ``sql``; yields its pid."""
    conn = await asyncpg.connect(url)
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(sql)
        yield conn.get_server_pid()
    finally:
        await transaction.rollback()
        await conn.close()


def write_config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(f"""\
admin_listen: null
data_dir: {tmp_path / "data"}
database: {{url: "{url}"}}
routes:
  - name: r
    primary: {{url: "http://127.0.0.1:9"}}
    shadows: [{{name: s, url: "http://127.0.0.1:8"}}]
""")
    return path


async def run(argv: list[str]) -> tuple[int, float]:
    """The command line in a thread of its own (it runs its own event loop): its exit status
    and how long it took."""
    started = time.monotonic()
    status = await asyncio.to_thread(main, argv)
    return status, time.monotonic() - started


@pytest.mark.parametrize(("lock", "command", "expected"), [
    # CREATE INDEX takes this lock, which the row-by-row delete waits for.
    ("LOCK TABLE shadowproxy.requests IN SHARE MODE",
     ["prune", "-c", "CONFIG", "--older-than", "1d"], "prune failed on "),
    ("LOCK TABLE shadowproxy.requests IN ACCESS EXCLUSIVE MODE",
     ["report", "-c", "CONFIG", "--route", "r"], "a report query failed: "),
    ("LOCK TABLE shadowproxy.labels IN ACCESS EXCLUSIVE MODE",
     ["labels", "import", "-c", "CONFIG", "LABELS"], "importing labels failed: "),
    ("LOCK TABLE shadowproxy.requests_default IN ACCESS EXCLUSIVE MODE",
     ["migrate", "-c", "CONFIG"], "preparing the partitions failed: "),
])
async def test_a_command_behind_a_table_lock_fails_in_bounded_time(
        database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], lock: str,
        command: list[str], expected: str) -> None:
    config = write_config(tmp_path, database_url)
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,label\nabc,1\n")
    argv = [{"CONFIG": str(config), "LABELS": str(labels)}.get(a, a) for a in command]
    async with holding(database_url, lock):
        status, took = await run(argv)
    err = capsys.readouterr().err
    assert status == 1, err
    assert took < WAIT_S + 10
    assert expected in err and LOCKED in err, err
    assert "docs/operations.md (Locks) shows how to find it" in err
    status, _ = await run(argv)  # the lock released: the command goes through
    assert status == 0, capsys.readouterr().err


@pytest.mark.parametrize("command", [["prune", "--older-than", "1d"], ["migrate"]])
async def test_a_command_behind_the_maintenance_lock_names_its_holder(
        database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        command: list[str]) -> None:
    """The maintenance lock (another prune or migrate, a proxy's maintenance run) held
    past the wait: the command says so, with the holder's backend pid."""
    config = write_config(tmp_path, database_url)
    async with holding(database_url, f"SELECT pg_advisory_xact_lock({MAINTENANCE_LOCK})"
                       ) as pid:
        status, took = await run([command[0], "-c", str(config), *command[1:]])
    err = capsys.readouterr().err
    assert status == 1, err
    assert took < WAIT_S + 10
    assert (f"another process holds the maintenance lock (PostgreSQL backend {pid}), still "
            "after 1s: `shadowproxy migrate` or `prune`, or a proxy's maintenance run") in err


async def test_migrate_behind_the_migration_lock_says_so(
        database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, database_url)
    async with holding(database_url, f"SELECT pg_advisory_xact_lock({_LOCK_KEY})"):
        status, took = await run(["migrate", "-c", str(config)])
    err = capsys.readouterr().err
    assert status == 1, err
    assert took < WAIT_S + 10
    assert ("another process has been applying the schema migrations for longer than 1s "
            "(`shadowproxy migrate`, or a proxy or replay starting)") in err
