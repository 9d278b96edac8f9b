"""A database that refuses the proxy for good is not an outage: it is named, shown in /readyz
and in metrics, retried slowly, and picked up once fixed; an outage stays "ready"."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from shadowproxy.errors import MigrationError
from shadowproxy.recorder import recorder as recorder_module
from shadowproxy.store.database import classify, describe
from tests.conftest import StartProxy, route, with_database
from tests.pgcontrol import OwnPostgres
from tests.test_admin import samples
from tests.test_run_command import free_port
from tests.upstreams import model, serve

PASSWORD = "Pw-in-the-url-7731"
"""The password the proxy's URL carries (wrong until the test sets the role's to it)."""
ROLE_PASSWORD = "Pw-of-the-role-2209"


class TcpPostgres(OwnPostgres):
    """A PostgreSQL of the test's own on 127.0.0.1 with password authentication: role
    ``sp_app`` logs in with a password, members of ``tls_only`` only over TLS (the server
    has none, as if the client had not asked for it)."""

    HBA = ("local all all trust\n"
           "host all postgres 127.0.0.1/32 trust\n"
           "hostnossl all +tls_only 127.0.0.1/32 reject\n"
           "host all all 127.0.0.1/32 scram-sha-256\n")

    def __init__(self) -> None:
        super().__init__()
        self.stop()
        (self._server.pgdata / "pg_hba.conf").write_text(self.HBA)
        self.port = free_port()
        self.start()
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        socket_dir = self.url.split("host=")[1]
        self._ctl("-w", "-o", f"-h 127.0.0.1 -p {self.port}", "-o", f"-k {socket_dir}",
                  "-l", str(self._server.log), "start")

    def url_for(self, user: str, password: str, database: str = "app") -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"


@pytest.fixture(scope="module")
def tcp_pg() -> Iterator[TcpPostgres]:
    pg = TcpPostgres()

    async def roles() -> None:
        conn = await asyncpg.connect(pg.admin_url)
        try:
            await conn.execute(f"CREATE ROLE sp_app LOGIN PASSWORD '{ROLE_PASSWORD}'")
            await conn.execute("CREATE ROLE tls_only NOLOGIN")
            await conn.execute(f"CREATE ROLE sp_tls LOGIN PASSWORD '{PASSWORD}' IN ROLE tls_only")
            await conn.execute("CREATE DATABASE app OWNER sp_app")
        finally:
            await conn.close()

    asyncio.run(roles())
    yield pg
    pg.close()


@pytest.fixture
def quick_retry(monkeypatch: pytest.MonkeyPatch) -> float:
    """Permanent problems are retried every 0.3 s instead of every minute."""
    monkeypatch.setattr(recorder_module, "_PERMANENT_RETRY_S", 0.3)
    return 0.3


async def admin_state(http: aiohttp.ClientSession, port: int
                      ) -> tuple[int, dict[str, Any], dict[str, float]]:
    """(/readyz status, its JSON, the database metrics)."""
    ready = await http.get(f"http://127.0.0.1:{port}/readyz")
    m = samples(await (await http.get(f"http://127.0.0.1:{port}/metrics")).text())
    metrics = {"up": m[("shadowproxy_database_up", ())],
               **{c: m[("shadowproxy_database_error", (("class", c),))]
                  for c in ("transient", "permanent")}}
    return ready.status, await ready.json(), metrics


async def until_ready(http: aiohttp.ClientSession, port: int, timeout: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (await http.get(f"http://127.0.0.1:{port}/readyz")).status != 200:
        assert asyncio.get_running_loop().time() < deadline, "never became ready"
        await asyncio.sleep(0.1)


async def serve_some(http: aiohttp.ClientSession, port: int, n: int) -> None:
    for i in range(n):
        resp = await http.post(f"http://127.0.0.1:{port}/p", json={"features": {"i": i}})
        assert resp.status == 200


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


async def test_a_wrong_password_is_named_not_ready_and_picked_up_once_fixed(
        start_proxy: StartProxy, tcp_pg: TcpPostgres, quick_retry: float,
        caplog: pytest.LogCaptureFixture) -> None:
    """A wrong password: clients are served and records spooled, the log says what to fix
    (and no password), /readyz is 503 with the cause, the metrics say permanent; once the
    role's password is changed to the URL's, the proxy connects and stores every record."""
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url)], url=tcp_pg.url_for("sp_app", PASSWORD)) as proxy, \
            aiohttp.ClientSession() as http:
        await serve_some(http, proxy.port, 5)
        await proxy.recorder.drained()
        await asyncio.sleep(3 * quick_retry)  # a few retries: still one line in the log
        status, ready, metrics = await admin_state(http, proxy.admin_port)
        assert status == 503 and ready["status"] == "not ready"
        assert ready["database_error"]["class"] == "permanent"
        assert "password authentication failed" in ready["database_error"]["cause"]
        assert "password" in ready["database_error"]["fix"]
        assert metrics == {"up": 0, "transient": 0, "permanent": 1}
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1
        assert "password authentication failed" in errors[0].getMessage()
        assert proxy.metrics.records["spooled"] == 5

        conn = await asyncpg.connect(tcp_pg.admin_url)
        try:
            await conn.execute(f"ALTER ROLE sp_app PASSWORD '{PASSWORD}'")
        finally:
            await conn.close()
        await until_ready(http, proxy.admin_port)
        status, ready, metrics = await admin_state(http, proxy.admin_port)
        assert "database_error" not in ready
        assert metrics == {"up": 1, "transient": 0, "permanent": 0}
        await serve_some(http, proxy.port, 3)
    conn = await asyncpg.connect(with_database(tcp_pg.admin_url, "app"))
    try:
        assert await conn.fetchval("SELECT count(*) FROM shadowproxy.requests") == 8
        await conn.execute(f"ALTER ROLE sp_app PASSWORD '{ROLE_PASSWORD}'")
    finally:
        await conn.close()
    assert PASSWORD not in log_text(caplog) and ROLE_PASSWORD not in log_text(caplog)


async def test_a_database_that_does_not_exist_is_permanent_until_created(
        start_proxy: StartProxy, pg_server_url: str, quick_retry: float,
        caplog: pytest.LogCaptureFixture) -> None:
    """A URL naming a database that does not exist: not ready, named in /readyz and the
    log; once the database is created the proxy migrates it and stores what it spooled."""
    name = "sp_not_created_yet"
    url = with_database(pg_server_url, name)
    try:
        async with serve(model("v1")) as primary, \
                start_proxy([route(primary.url)], url=url) as proxy, \
                aiohttp.ClientSession() as http:
            await serve_some(http, proxy.port, 4)
            status, ready, metrics = await admin_state(http, proxy.admin_port)
            assert status == 503 and ready["database_error"]["class"] == "permanent"
            assert f'database "{name}" does not exist' in ready["database_error"]["cause"]
            assert metrics["permanent"] == 1
            assert "create the database" in log_text(caplog)
            conn = await asyncpg.connect(pg_server_url)
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()
            await until_ready(http, proxy.admin_port)
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM shadowproxy.requests") == 4
        finally:
            await conn.close()
    finally:
        conn = await asyncpg.connect(pg_server_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def test_a_server_demanding_tls_is_a_permanent_error(
        start_proxy: StartProxy, tcp_pg: TcpPostgres, quick_retry: float) -> None:
    """A server whose pg_hba.conf admits this user over TLS only refuses the plain
    connection: a permanent error that says so, not an outage."""
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url)], url=tcp_pg.url_for("sp_tls", PASSWORD)) as proxy, \
            aiohttp.ClientSession() as http:
        await serve_some(http, proxy.port, 2)
        status, ready, metrics = await admin_state(http, proxy.admin_port)
    assert status == 503 and ready["database_error"]["class"] == "permanent"
    assert "no encryption" in ready["database_error"]["cause"]
    assert "sslmode=require" in ready["database_error"]["fix"]
    assert metrics == {"up": 0, "transient": 0, "permanent": 1}


async def test_an_unreachable_server_is_an_outage_and_stays_ready(
        start_proxy: StartProxy, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing listening where the database should be is transient: /readyz stays 200 while
    the spool has room, says why, and the log warns (no error)."""
    url = f"postgresql://sp_app:{PASSWORD}@127.0.0.1:{free_port()}/app"
    async with serve(model("v1")) as primary, \
            start_proxy([route(primary.url)], url=url) as proxy, \
            aiohttp.ClientSession() as http:
        await serve_some(http, proxy.port, 2)
        status, ready, metrics = await admin_state(http, proxy.admin_port)
    assert status == 200 and ready["database"] == "unreachable, spooling"
    assert ready["database_error"]["class"] == "transient" and "fix" not in ready[
        "database_error"]
    assert metrics == {"up": 0, "transient": 1, "permanent": 0}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "database not reachable at start-up" in log_text(caplog)
    assert PASSWORD not in log_text(caplog)


def test_errors_are_classified_by_type_and_sqlstate_not_text() -> None:
    """Refused, timed out, too many connections, starting or shutting down: transient. No
    such database, bad password or user, no privilege, a failed TLS handshake: permanent,
    also when wrapped by a migration error."""
    transient = [ConnectionRefusedError(111, "refused"), TimeoutError(),
                 asyncpg.TooManyConnectionsError("too many clients already"),
                 asyncpg.CannotConnectNowError("the database system is starting up"),
                 asyncpg.AdminShutdownError("terminating connection"),
                 asyncpg.ConnectionDoesNotExistError("closed")]
    permanent = [asyncpg.InvalidPasswordError("password authentication failed"),
                 asyncpg.InvalidCatalogNameError('database "x" does not exist'),
                 asyncpg.InvalidAuthorizationSpecificationError("no pg_hba.conf entry"),
                 asyncpg.InsufficientPrivilegeError("permission denied for database x"),
                 ssl.SSLCertVerificationError("certificate verify failed")]
    wrapped = MigrationError("migration 001 failed")
    wrapped.__cause__ = asyncpg.InsufficientPrivilegeError("permission denied for schema")
    assert [classify(e).kind for e in transient] == ["transient"] * len(transient)
    assert [classify(e).kind for e in [*permanent, wrapped]] == ["permanent"] * 6
    assert all(classify(e).fix for e in permanent)


def test_urls_are_printed_without_their_password() -> None:
    """The password is hidden wherever the URL carries it, the user's part or a query
    parameter."""
    assert describe("postgresql://sp:s3cret@db:5432/app?sslmode=require&password=s3cret") \
        == "postgresql://sp:***@db:5432/app?sslmode=require&password=***"
