"""Connecting to PostgreSQL: connections, URLs fit for logs, and what a connection error means.

``classify`` tells a permanent connection problem (a database that does not exist, a wrong
password, a server that wants TLS: only the operator can fix those) from a transient one (a
server down, restarting or overloaded), from the exception's type and SQLSTATE, never from
its text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from shadowproxy.config import DATABASE_URL_ENV, Settings
from shadowproxy.errors import DatabaseError
from shadowproxy.store.embedded import CleanupMode, start_embedded

log = logging.getLogger("shadowproxy")

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


_CANCEL_POLL_S = 0.1
"""How often an open command connection checks whether its command was interrupted."""

LOCK_TIMEOUT_S = 30.0
"""How long a statement of a connection made here waits for a lock that another session
holds (PostgreSQL's ``lock_timeout``) before it fails, saying so (``reason``): without it a
command behind an open transaction, a VACUUM FULL or a CREATE INDEX on the tables waited
without end and without a word. Not a ``statement_timeout``: a report over a long window
may rightly run for minutes; only the wait on someone else's lock is bounded. A
transaction of the maintenance sets its own, shorter one (``partitions.LOCK_TIMEOUT``)."""

LOCK_HINT = ("another session held a lock on the shadowproxy tables that this needed longer "
             "than a command waits for one ({wait:g} s; 5 s to make or drop a partition): an "
             "open transaction that wrote to or locked them, a VACUUM FULL, CREATE INDEX or "
             "ALTER TABLE; docs/operations.md (Locks) shows how to find it; run the command "
             "again once it has ended")

RECORDER_LOCK_TIMEOUT_S = 3.0
"""How long a statement of the recorder (a write, or a migration it applies when it connects)
waits for a lock that another session holds; then the batch goes to the spool, the
replay tries again, and the proxy goes on serving. It waited for the writer's whole 15 s
timeout, which then said the database gave no answer: a start behind another process's
migrations began to serve only then, and a write behind a CREATE INDEX or an open
transaction blamed the network. As long as the proxy's start waits for the database to
answer (``recorder.START_CHECK_S``)."""

RECORDER_LOCK_HINT = ("another session held a lock on the shadowproxy tables that the "
                      "recorder needed for longer than it waits for one ({wait:g} s): an "
                      "open transaction that wrote to or locked them, a VACUUM FULL, CREATE "
                      "INDEX or ALTER TABLE; docs/operations.md (Locks) shows how to find "
                      "it; records go to the spool until it is released, and are stored then")

PERMANENT = "permanent"
TRANSIENT = "transient"


@dataclass(frozen=True)
class ConnectionProblem:
    """Why the database cannot be used now, fit for logs, /readyz and metrics."""

    kind: str
    """``PERMANENT`` (retrying alone will not help) or ``TRANSIENT``."""
    cause: str
    """What the server or the socket said (``describe_error``: no password, no value)."""
    fix: str
    """What the operator must do; empty for a transient problem."""
    locked: bool = False
    """The database answers, but another session's lock held the work up past its wait:
    nothing is wrong with the network or the server."""

    @property
    def permanent(self) -> bool:
        return self.kind == PERMANENT


_URL = "database.url (or SHADOWPROXY_DATABASE_URL)"
# (exception type, what to fix), most specific first. A TLS requirement of the server shows
# as 28000 ("no pg_hba.conf entry ... no encryption").
_PERMANENT: tuple[tuple[type[BaseException], str], ...] = (
    (asyncpg.InvalidPasswordError,
     f"correct the password in {_URL}, or the role's password on the server"),
    (asyncpg.InvalidAuthorizationSpecificationError,
     f"the server refuses this user from this host: check the user name in {_URL}, "
     "the role on the server, and its pg_hba.conf (a server that requires TLS needs "
     "sslmode=require in the URL)"),
    (asyncpg.InvalidCatalogNameError,
     f"create the database on the server, or correct its name in {_URL}"),
    (asyncpg.InsufficientPrivilegeError,
     "grant the proxy's role CONNECT on the database and, for the migrations, CREATE "
     "(see THREAT_MODEL.md, 'Who can read it')"),
    (ssl.SSLError, f"the TLS handshake failed: check sslmode and the certificates in {_URL}"),
    (asyncpg.ClientConfigurationError, f"correct {_URL}"),
)


def classify(exc: BaseException) -> ConnectionProblem:
    """The problem an exception from connecting (or migrating) shows; anything not known to
    be permanent is transient, so that a server that comes back is always used again."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, asyncpg.LockNotAvailableError):
            # Another session's lock, named by the error that wraps it (the driver's own
            # says only "canceling statement due to lock timeout").
            return ConnectionProblem(TRANSIENT, describe_error(exc), "", locked=True)
        for kind, fix in _PERMANENT:
            if isinstance(seen, kind):
                return ConnectionProblem(PERMANENT, describe_error(seen), fix)
        if isinstance(seen, asyncpg.PostgresError | OSError | TimeoutError):
            return ConnectionProblem(TRANSIENT, describe_error(seen), "")
        seen = seen.__cause__  # DatabaseError and MigrationError wrap the driver's error
    return ConnectionProblem(TRANSIENT, describe_error(exc), "")


def database_url(settings: Settings, *, embedded_cleanup: CleanupMode = "stop") -> str:
    """The configured URL, or that of the embedded server (started if needed)."""
    if settings.database.url:
        return settings.database.url
    return start_embedded(settings.data_dir, cleanup=embedded_cleanup)


def describe(url: str) -> str:
    """A URL safe to print: the password is hidden (also one given as a query parameter)."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        parts = parts._replace(netloc=netloc)
    if parts.query:
        query = [(k, "***" if k.lower() in ("password", "sslpassword") else v)
                 for k, v in parse_qsl(parts.query, keep_blank_values=True)]
        parts = parts._replace(query=urlencode(query, safe="/:*"))
    return urlunsplit(parts)


def describe_error(exc: BaseException) -> str:
    """What went wrong, fit for a log line: never a value from a record.

    PostgreSQL's messages about data (SQLSTATE classes 22 and 23) can quote the value, and
    a DETAIL can quote a body (``Token "4111…" is invalid``); the driver's own messages
    about a value it could not encode quote it too. For those only the condition is named.
    """
    if isinstance(exc, asyncpg.PostgresError):
        code = exc.sqlstate or "?"
        if code.startswith(("22", "23")) or not exc.args:
            return f"{type(exc).__name__} (SQLSTATE {code})"
        return f"{exc.args[0]} (SQLSTATE {code})"
    if isinstance(exc, ValueError | TypeError):
        return type(exc).__name__
    return str(exc) or type(exc).__name__


def reason(exc: BaseException) -> str:
    """What a failed statement says, and for a lock not had in time (``LOCK_TIMEOUT_S``, or
    a maintenance transaction's own) what that means and what to do."""
    if isinstance(exc, asyncpg.LockNotAvailableError):
        return f"{exc}: {LOCK_HINT.format(wait=LOCK_TIMEOUT_S)}"
    return str(exc)


async def connect(url: str, *, timeout: float = 10.0) -> asyncpg.Connection:
    """One connection, whose waits for a lock last ``LOCK_TIMEOUT_S`` at most; DatabaseError
    says where it tried and why it failed."""
    try:
        conn = await asyncpg.connect(url, timeout=timeout)
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        # A URL from the environment is not the one the file shows: say so.
        source = (f" (from {DATABASE_URL_ENV}, which overrides database.url)"
                  if os.environ.get(DATABASE_URL_ENV) == url else "")
        fix = classify(exc).fix or (f"check that PostgreSQL runs at that host and port and "
                                    f"accepts connections, or correct {_URL}")
        # A server that never answers (a firewall dropping packets, a network partition)
        # times out, and a TimeoutError has no text of its own.
        why = (f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError)
               else str(exc) or type(exc).__name__)
        raise DatabaseError(f"cannot connect to PostgreSQL at {describe(url)}{source}: {why}; "
                            f"{fix}") from exc
    try:
        # A statement, not a startup parameter (asyncpg's server_settings), which a
        # connection pooler such as PgBouncer refuses.
        await conn.execute(f"SET lock_timeout = '{round(LOCK_TIMEOUT_S * 1000)}ms'")
    except BaseException as exc:
        conn.terminate()
        if isinstance(exc, (*CONNECTION_ERRORS, asyncpg.PostgresError)):
            raise DatabaseError(f"cannot use the connection to PostgreSQL at {describe(url)}: "
                                f"{exc}") from exc
        raise
    return conn


@contextlib.asynccontextmanager
async def connection(url: str, *, timeout: float = 10.0, close_timeout: float | None = None,
                     watch: bool = True) -> AsyncIterator[asyncpg.Connection]:
    """``async with connection(url) as conn``: connect, and always close.

    A command interrupted (Ctrl-C cancels its task) drops the connection at once, rather
    than close it politely: PostgreSQL then ends the session and rolls back what it had
    open. Behind a database that stopped answering (a network partition) the polite way
    never ends: a transaction cancelled mid-query sends ROLLBACK and waits for its answer,
    so Ctrl-C left the command hanging. A close waits ``close_timeout`` (by default
    ``timeout``) at most, then drops it.

    ``watch``: a task polls for the cancellation and drops the connection under whatever
    waits on it then (a command's Ctrl-C); a task of the proxy's own, whose waits are
    bounded otherwise, passes False and is dropped when the cancellation reaches the
    ``async with``."""
    conn = await connect(url, timeout=timeout)
    owner = asyncio.current_task()
    watcher = (asyncio.ensure_future(_drop_when_cancelled(owner, conn))
               if watch and owner is not None else None)
    try:
        yield conn
    except BaseException as exc:
        if owner is not None and owner.cancelling():
            conn.terminate()
            if not isinstance(exc, asyncio.CancelledError):
                # What the drop broke (a ROLLBACK on the closed connection) is not the
                # news: the interruption is (exit status 130, no traceback).
                raise asyncio.CancelledError() from exc
        raise
    finally:
        if watcher is not None:
            watcher.cancel()
        with contextlib.suppress(Exception):  # asyncpg drops it when closing fails
            await conn.close(timeout=timeout if close_timeout is None else close_timeout)


async def _drop_when_cancelled(owner: asyncio.Task[Any], conn: asyncpg.Connection) -> None:
    """Drop ``conn`` as soon as ``owner`` is asked to stop (a Ctrl-C), whatever it waits
    for on the connection then: the wait fails at once instead of holding the stop."""
    while not owner.cancelling():
        await asyncio.sleep(_CANCEL_POLL_S)
    conn.terminate()


_UNRETRIEVED = "Future exception was never retrieved"
_LOST = "unexpected connection_lost() call"
"""asyncpg's ``TLSUpgradeProto``: the ConnectionError of the wait for the server's answer
to its SSL request, when the connection attempt is dropped."""


def _lost(exc: object) -> bool:
    """Whether ``exc`` is the driver's error for a connection that is gone."""
    return isinstance(exc, asyncpg.ConnectionDoesNotExistError) or (
        type(exc) is ConnectionError and str(exc) == _LOST)


def quiet_cut_waiters(loop: asyncio.AbstractEventLoop) -> None:
    """Keep out of the log the driver's own wait that a cut leaves behind (once per loop):
    the recorder's writer calls it when it cuts a connection, and every command's loop
    has it (``runner.run_command``), whose connection a Ctrl-C drops (``connection``).

    A COPY whose data the database stopped taking (a network partition: the socket's
    buffers full, the transport paused) waits for room to write; the cut fails the
    driver's wait for the server's answer, and the COPY, woken, fails on the dropped
    transport (AttributeError) before it collects that wait's error: asyncpg's clean-up
    writes its CopyFail to the transport its abort has dropped. The error is then never
    retrieved, and asyncio logged it as an ERROR with a traceback when the future was
    freed (the next cyclic collection, ``cycles.py``; a command's exit), after the writer
    or the command had said what happened. The future is the driver's, out of reach: only
    its report is caught here, and only for a connection's loss, which the work waiting
    on it has surfaced already: ConnectionDoesNotExistError, or the ConnectionError that
    asyncpg's TLS negotiation gives its wait for the server's answer when the connection
    attempt is cut (``_LOST``: a Ctrl-C while a command connects); anything else goes to
    the handler that was there."""
    previous = loop.get_exception_handler()
    if getattr(previous, "quiets_cut_waiters", False):
        return

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == _UNRETRIEVED and _lost(context.get("exception")):
            log.debug("the driver's wait on a database connection that was cut ended with "
                      "%s", context["exception"])
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler.quiets_cut_waiters = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)


async def placeholders(conn: asyncpg.Connection, sql: str) -> int:
    """How many parameters ($1, $2, …) PostgreSQL finds in ``sql``, parsed and planned, not
    run. An operator's condition (``replay --where``, a ``compare.slices`` condition) must
    have none: PostgreSQL infers a placeholder's type, and the command's own value in that
    place would be bound to it."""
    return len((await conn.prepare(sql)).get_parameters())


async def fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """Run one query on a fresh connection (for commands, never for the data path)."""
    async with connection(url) as conn:
        try:
            return list(await conn.fetch(query, *args))
        except asyncpg.PostgresError as exc:
            raise DatabaseError(f"query failed: {reason(exc)}") from exc
