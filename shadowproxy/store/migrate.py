"""Versioned schema migrations, applied in order under an advisory lock.

Each ``migrations/NNN_name.sql`` runs once, in its own transaction, and is recorded in
``shadowproxy.schema_migrations``. The advisory lock makes concurrent start-ups safe: the
first process migrates, the others wait and then find nothing to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from shadowproxy.errors import MigrationError
from shadowproxy.store.database import connection

# An arbitrary, fixed key for pg_advisory_lock: "shadowproxy" spelled in hex-ish digits.
_LOCK_KEY = 0x5AD0_0000_0001
_FILE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    """Every migration shipped with the package, in version order."""
    found = []
    for entry in resources.files("shadowproxy.store").joinpath("migrations").iterdir():
        m = _FILE.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text("utf-8")))
    return sorted(found, key=lambda mig: mig.version)


async def apply(conn: asyncpg.Connection) -> list[Migration]:
    """Bring the schema up to date on ``conn``; return the migrations applied now."""
    applied_now = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            "CREATE SCHEMA IF NOT EXISTS shadowproxy;"
            "CREATE TABLE IF NOT EXISTS shadowproxy.schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())")
        done = {r["version"] for r in await conn.fetch(
            "SELECT version FROM shadowproxy.schema_migrations")}
        for mig in available():
            if mig.version in done:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(mig.sql)
                    await conn.execute(
                        "INSERT INTO shadowproxy.schema_migrations (version, name) "
                        "VALUES ($1, $2)", mig.version, mig.name)
            except asyncpg.PostgresError as exc:
                raise MigrationError(
                    f"migration {mig.version:03d}_{mig.name} failed: {exc}; "
                    "the schema is left at the previous version") from exc
            applied_now.append(mig)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now


async def migrate(url: str) -> list[Migration]:
    """Connect to ``url`` and apply pending migrations."""
    async with connection(url) as conn:
        return await apply(conn)
