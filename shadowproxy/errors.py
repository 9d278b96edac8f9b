"""The one exception hierarchy of shadowproxy.

Third-party errors (aiohttp, asyncio, asyncpg, OS) are translated into these at the module
that talks to that library, with ``raise ... from exc``; the command line maps them to exit
codes (see ``cli.py``). Besides it, only a worker process ends itself (``workers.py``),
with the status its supervisor reads.

    ShadowProxyError
    ├── ConfigError          invalid configuration file (exit status 2)
    ├── UsageError           bad command-line arguments or input files (exit status 2)
    ├── DatabaseError        PostgreSQL unreachable or failing (exit status 1)
    │   └── MigrationError   a schema migration could not be applied
    ├── EmbeddedDatabaseError  the embedded PostgreSQL could not be started
    ├── SpoolError           the on-disk spool could not be written or read
    ├── ListenError          `listen` or `admin_listen` cannot be bound (in use, no such address)
    ├── MissingExtraError    a command needs an optional extra that is not installed
    ├── Interrupted          a command was stopped by Ctrl-C (exit status 130)
    └── DemoError            a step of `shadowproxy demo` failed (a process, the records)

Failures of upstream calls are not exceptions: they are data on the exchange record (an
``ErrorKind`` from ``failures.py`` with a detail, ``connect`` / ``"connect: Connection
refused"``), because a shadow's failure must never reach the client.
"""

from __future__ import annotations


class ShadowProxyError(Exception):
    """Base of every error shadowproxy raises on purpose."""

    exit_status = 1


class ConfigError(ShadowProxyError):
    """The configuration file is invalid; ``problems`` lists each as FILE:LINE: key: message."""

    exit_status = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class UsageError(ShadowProxyError):
    """A command was called with arguments or input it cannot use."""

    exit_status = 2


class DatabaseError(ShadowProxyError):
    """PostgreSQL could not be reached or refused a statement."""


class MigrationError(DatabaseError):
    """A schema migration failed; the database is left at the last applied version."""


class MigrationsBusyError(MigrationError):
    """Another process held the schema migrations' lock for longer than the connection's
    ``lock_timeout``: it is applying them. ``holder``: its PostgreSQL backend, if known."""

    def __init__(self, message: str, holder: int | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class EmbeddedDatabaseError(ShadowProxyError):
    """The embedded PostgreSQL under ``data_dir`` could not be initialised or started."""


class ListenError(ShadowProxyError):
    """A listening address could not be bound."""


class DataDirInUse(ShadowProxyError):
    """Another ``shadowproxy run`` holds ``data_dir`` (or it cannot be claimed)."""


class SpoolError(ShadowProxyError):
    """The spool directory could not be written or read."""


class UnreadableFrame(SpoolError):
    """A spool segment's frame that cannot be read back (cut short by a crash, altered on
    disk, or not in this version's layout), at byte ``offset`` of its segment: the frames
    before it are whole, what follows cannot be told apart from it."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class MissingExtraError(ShadowProxyError):
    """A command needs packages of an optional extra (pyproject.toml) that are not
    installed; the message names the extra and the command that installs it. Exit status 1,
    as for anything else the machine lacks: the command itself was well formed."""


class Interrupted(ShadowProxyError):
    """A command was stopped by Ctrl-C (SIGINT); the message says what that left (nothing
    imported, the migrations applied so far) and what to do."""

    exit_status = 130


class DemoError(ShadowProxyError):
    """A step of the demo failed: a process did not start, or records did not arrive."""
