"""A role with only the rights THREAT_MODEL.md gives the proxy (USAGE on schema
``shadowproxy``, SELECT and INSERT on its tables; CREATE on the database only once, for
the migrations) records, and a command that needs the migrations says what to grant."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shadowproxy.config import RecordingConfig
from shadowproxy.recorder.postgres import PostgresWriter
from shadowproxy.recorder.rows import RowEncoder
from shadowproxy.store.database import connection
from tests.db import fetchval
from tests.recorder.exchanges import exchange
from tests.replay.helpers import cli, write_config


@pytest.fixture
async def app_role(database_url: str) -> AsyncIterator[str]:
    """A role with USAGE on the migrated schema and SELECT, INSERT on its tables, and no
    CREATE on the database; yields its name."""
    role = "sp_app_" + uuid.uuid4().hex[:8]
    async with connection(database_url) as admin:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute(f"GRANT USAGE ON SCHEMA shadowproxy TO {role}")
        await admin.execute(f"GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA shadowproxy "
                            f"TO {role}")
        try:
            yield role
        finally:
            await admin.execute(f"DROP OWNED BY {role}")
            await admin.execute(f"DROP ROLE {role}")


def _as(url: str, role: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{role}@{rest.partition('@')[2]}"


async def test_a_role_without_create_records_into_a_migrated_database(
        database_url: str, app_role: str) -> None:
    """The writer checks the migrations when it connects: on an up-to-date schema that is
    a read. It ran `CREATE SCHEMA IF NOT EXISTS`, which PostgreSQL refuses without CREATE
    on the database even when the schema exists, so a proxy whose role was given CREATE
    only once recorded nothing: every batch went to the spool, the log saying to grant
    CREATE for good."""
    writer = PostgresWriter(_as(database_url, app_role), timeout=5)
    try:
        await writer.write(*RowEncoder(RecordingConfig()).encode([exchange(1)]))
    finally:
        await writer.close(1)
    assert await fetchval(database_url, "SELECT count(*) FROM shadowproxy.requests") == 1


async def test_migrate_as_a_role_without_create_on_a_new_database_says_what_to_grant(
        empty_database_url: str, tmp_path: Path) -> None:
    """`shadowproxy migrate` on a database never migrated, as a role that may not create a
    schema there: exit status 1, and the message says what to grant. It said `preparing
    the partitions failed: ...; the migrations are applied, run shadowproxy migrate
    again`, none of which was so."""
    role = "sp_new_" + uuid.uuid4().hex[:8]
    async with connection(empty_database_url) as admin:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        database = await admin.fetchval("SELECT current_database()")
        try:
            config = write_config(tmp_path, _as(empty_database_url, role))
            result = await cli("migrate", "-c", str(config))
        finally:
            await admin.execute(f"DROP ROLE {role}")
    assert result.status == 1, result.err
    assert result.err == (
        f"shadowproxy: creating schema shadowproxy failed: permission denied for database "
        f"{database}; the migrations need CREATE on the database once: GRANT CREATE ON "
        f"DATABASE {database} TO {role}, or run `shadowproxy migrate` as a role that has "
        "it\n"), result.err
