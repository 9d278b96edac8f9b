"""Versioned schema migrations, applied in order under an advisory lock.

Each ``migrations/NNN_name.sql`` runs once, in its own transaction, and is recorded in
``shadowproxy.schema_migrations``. The advisory lock makes concurrent start-ups safe: the
first process migrates, the others wait and then find nothing to do.

``apply`` is the SQL only, quick, and what the recorder runs when it connects. ``migrate``
(the ``shadowproxy migrate`` command) also does what SQL alone cannot: it creates the time
partitions ahead (``partitions.ensure``) and moves the rows of an upgraded database into
the partitioned tables (``legacy.move``), under the maintenance lock that the proxies'
maintenance task takes too, while proxies keep writing.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from shadowproxy.errors import MigrationError, MigrationsBusyError
from shadowproxy.store import legacy, partitions
from shadowproxy.store.database import connection, reason
from shadowproxy.store.legacy import Moved
from shadowproxy.store.partitions import MAINTENANCE_LOCK

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


async def lock_holder(conn: asyncpg.Connection) -> int | None:
    """The PostgreSQL backend that holds the migrations' advisory lock now, if any."""
    pid: int | None = await conn.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND classid = $1 AND objid = $2 AND objsubid = 1 AND pid <> pg_backend_pid() "
        "LIMIT 1", _LOCK_KEY >> 32, _LOCK_KEY & 0xFFFF_FFFF)
    return pid


_BOOTSTRAPPED = """
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                   WHERE n.nspname = 'shadowproxy' AND c.relname = 'schema_migrations')"""


async def apply(conn: asyncpg.Connection) -> list[Migration]:
    """Bring the schema up to date on ``conn``; return the migrations applied now."""
    applied_now = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    except asyncpg.LockNotAvailableError as exc:  # a command's connection waits so long
        holder = None
        with contextlib.suppress(asyncpg.PostgresError):  # naming it is a courtesy
            holder = await lock_holder(conn)
        by = f" (PostgreSQL backend {holder})" if holder else ""
        raise MigrationsBusyError(
            f"another process{by} has been applying the schema migrations for longer than "
            f"{await conn.fetchval('SHOW lock_timeout')} (`shadowproxy migrate`, or a proxy "
            "or replay starting); run the command again once it has finished",
            holder) from exc
    try:
        # Made only when missing: PostgreSQL checks CREATE on the database before it sees
        # that a schema exists, and a role given CREATE once, for the migrations
        # (THREAT_MODEL.md), could then not even check them (the recorder, a replay).
        if not await conn.fetchval(_BOOTSTRAPPED):
            try:
                await conn.execute(
                    "CREATE SCHEMA IF NOT EXISTS shadowproxy;"
                    "CREATE TABLE IF NOT EXISTS shadowproxy.schema_migrations ("
                    " version int PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())")
            except asyncpg.InsufficientPrivilegeError as exc:
                database, role = await conn.fetchrow(
                    "SELECT current_database(), current_user")
                raise MigrationError(
                    f"creating schema shadowproxy failed: {exc}; the migrations need CREATE "
                    f"on the database once: GRANT CREATE ON DATABASE {database} TO {role}, "
                    "or run `shadowproxy migrate` as a role that has it") from exc
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
                    f"migration {mig.version:03d}_{mig.name} failed: {reason(exc)}; "
                    "the schema is left at the previous version") from exc
            applied_now.append(mig)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now


@dataclass(frozen=True)
class Migrated:
    """What ``migrate_all`` did."""

    applied: list[Migration]
    created: list[str]
    """Suffixes of the time partitions created (``partitions.suffix``)."""
    moved: Moved
    """Rows moved from the legacy tables of an upgraded database."""


async def migrate_all(url: str, period: str = "day", *, batch_size: int = 5000) -> Migrated:
    """Apply pending migrations, create the partitions ahead, move legacy rows over."""
    async with connection(url) as conn:
        try:
            applied = await apply(conn)
            await _refuse_newer(conn)
            await partitions.lock_maintenance(conn)
            try:
                created = await partitions.ensure(conn, period)
                moved = await legacy.move(conn, batch_size=batch_size)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK)
        except asyncpg.PostgresError as exc:
            raise MigrationError(f"preparing the partitions failed: {reason(exc)}; the migrations "
                                 "are applied, run `shadowproxy migrate` again") from exc
    return Migrated(applied, created, moved)


async def _refuse_newer(conn: asyncpg.Connection) -> None:
    """MigrationError when a newer shadowproxy migrated the database (the proxy rolled
    back): this version's partitions and moves are not made for that schema, and
    `migrate` said `schema is up to date`."""
    last = available()[-1]
    newer = await conn.fetch("SELECT version, name FROM shadowproxy.schema_migrations "
                             "WHERE version > $1 ORDER BY version", last.version)
    if newer:
        names = ", ".join(f"{r['version']:03d}_{r['name']}" for r in newer)
        raise MigrationError(
            f"the database holds migration{'s' if len(newer) > 1 else ''} {names}, which "
            f"this shadowproxy does not know (its last is {last.version:03d}_{last.name}): "
            "a newer version migrated it; run that version or a later one against it")


async def migrate(url: str, period: str = "day") -> list[Migration]:
    """Connect to ``url``, apply pending migrations and prepare the partitions (see
    ``migrate_all``); return the migrations applied now."""
    return (await migrate_all(url, period)).applied
