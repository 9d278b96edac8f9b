"""`shadowproxy run` as a real process: start-up, serving, SIGTERM, workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from shadowproxy import control
from shadowproxy.cli import main
from tests.db import fetchval
from tests.upstreams import model, serve, sleeping


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, primary: str, shadow: str, database_url: str,
                 **extra: object) -> tuple[Path, int, int]:
    port, admin = free_port(), free_port()
    config = {
        "listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}",
        "data_dir": str(tmp_path / "data"), "database": {"url": database_url},
        "recording": {"flush_interval_ms": 50},
        "routes": [{"name": "r", "primary": {"url": primary},
                    "shadows": [{"name": "c", "url": shadow}]}],
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, port, admin


async def wait_ready(admin: int, proc: asyncio.subprocess.Process) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            if proc.returncode is not None:
                said = b"" if proc.stderr is None else await proc.stderr.read()
                raise AssertionError(f"shadowproxy exited early with {proc.returncode}: "
                                     f"{said.decode(errors='replace')[-2000:]}")
            try:
                if (await http.get(f"http://127.0.0.1:{admin}/readyz")).status == 200:
                    return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("shadowproxy did not become ready")


async def start(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shadowproxy", "run", "-c", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SHADOWPROXY_DATABASE_URL": ""})


async def count(url: str, table: str) -> int:
    return int(await fetchval(url, f"SELECT count(*) FROM shadowproxy.{table}"))


@pytest.mark.slow
async def test_sigterm_under_load_answers_everything_and_exits_0(
        tmp_path: Path, database_url: str) -> None:
    """Every request accepted before SIGTERM is answered and recorded; the exit status is 0."""
    async with serve(sleeping(0.3, model("v1"))) as primary, serve(model("v2")) as shadow:
        config, port, admin = write_config(tmp_path, primary.url, shadow.url, database_url)
        proc = await start(config)
        await wait_ready(admin, proc)
        async with aiohttp.ClientSession() as http:
            async def one() -> int:
                resp = await http.post(f"http://127.0.0.1:{port}/p", json={"features": {}})
                await resp.read()
                return resp.status

            tasks = [asyncio.ensure_future(one()) for _ in range(20)]
            # The stop begins once all 20 are in flight at the slow primary: a request still on
            # its way to the proxy then may meet the closed listener (a reset), which is the
            # stop's order (tests/test_stop_order.py), not what this test checks.
            deadline = time.monotonic() + 10
            while len(primary.seen) < 20:
                assert time.monotonic() < deadline, f"{len(primary.seen)} of 20 at the primary"
                await asyncio.sleep(0.01)
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGTERM)
            statuses = await asyncio.gather(*tasks)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    assert statuses == [200] * 20
    assert await count(database_url, "requests") == 20
    assert await count(database_url, "responses") == 40


@pytest.mark.slow
async def test_two_workers_share_the_port_and_the_metrics(
        tmp_path: Path, database_url: str) -> None:
    """workers: 2 serves on one port from two processes; /metrics sums both."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow:
        config, port, admin = write_config(tmp_path, primary.url, shadow.url, database_url,
                                           workers=2)
        proc = await start(config)
        await wait_ready(admin, proc)
        async with aiohttp.ClientSession() as http:
            for _ in range(40):
                # A new connection each time, so that the kernel spreads them over workers.
                async with aiohttp.ClientSession() as fresh:
                    await (await fresh.post(f"http://127.0.0.1:{port}/p", json={})).read()
            await asyncio.sleep(1.5)  # workers publish their counters every second
            text = await (await http.get(f"http://127.0.0.1:{admin}/metrics")).text()
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert 'shadowproxy_requests_total{code="200",route="r"} 40.0' in text
    assert await count(database_url, "requests") == 40
    pids = {p.name for p in (tmp_path / "data" / "spool").glob("*")}
    assert pids == set()  # nothing left spooled


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
async def test_a_second_proxy_on_the_same_data_dir_is_refused(
        tmp_path: Path, database_url: str, workers: int,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A second `shadowproxy run` on a data_dir in use (other ports) stops at once, exit
    status 1, naming the running one; it would have taken its place in the run files, so
    that `shadowproxy reload` of the first reached the second. The first still reloads, and
    once it stops the data_dir is free."""
    monkeypatch.delenv("SHADOWPROXY_DATABASE_URL", raising=False)
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow:
        first, _, admin = write_config(tmp_path, primary.url, shadow.url, database_url,
                                       workers=workers)
        proc = await start(first)
        await wait_ready(admin, proc)
        other = tmp_path / "other"
        other.mkdir()
        second, _, _ = write_config(other, primary.url, shadow.url, database_url,
                                    data_dir=str(tmp_path / "data"))
        assert main(["run", "-c", str(second)]) == 1
        err = capsys.readouterr().err
        assert f"data_dir {tmp_path / 'data'} is in use by another `shadowproxy run` " \
               f"({first}, pid {proc.pid})" in err
        assert main(["reload", "-c", str(first)]) == 0
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    os.close(control.claim(tmp_path / "data" / "run"))


def test_migrate_and_db_url_commands(tmp_path: Path, sync_database_url: str,
                                     capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """migrate reports an up-to-date schema; db-url prints the configured URL."""
    monkeypatch.delenv("SHADOWPROXY_DATABASE_URL", raising=False)
    config, _, _ = write_config(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2",
                                sync_database_url)
    assert main(["migrate", "-c", str(config)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["db-url", "-c", str(config)]) == 0
    assert capsys.readouterr().out.strip() == sync_database_url


def test_unreachable_database_is_a_clear_runtime_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """migrate against a database that is not there exits 1 and says where it tried."""
    monkeypatch.delenv("SHADOWPROXY_DATABASE_URL", raising=False)
    url = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    config, _, _ = write_config(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2", url)
    assert main(["migrate", "-c", str(config)]) == 1
    assert "cannot connect to PostgreSQL at postgresql://nobody@127.0.0.1" in \
        capsys.readouterr().err


def test_a_database_url_that_fails_says_what_to_do_and_where_it_came_from(
        tmp_path: Path, sync_database_url: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that cannot connect says what to check; a URL from SHADOWPROXY_DATABASE_URL
    (which the file does not show) is said to come from there."""
    monkeypatch.delenv("SHADOWPROXY_DATABASE_URL", raising=False)
    nowhere = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    config, _, _ = write_config(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2", nowhere)
    assert main(["prune", "-c", str(config), "--older-than", "30d"]) == 1
    err = capsys.readouterr().err
    assert "check that PostgreSQL runs at that host and port and accepts connections, or " \
           "correct database.url (or SHADOWPROXY_DATABASE_URL)" in err
    assert "from SHADOWPROXY_DATABASE_URL" not in err
    missing = sync_database_url.rsplit("/", 1)[0] + "/no_such_database"
    if "?" in sync_database_url:  # a Unix socket's URL: the host is in the query
        path, _, query = sync_database_url.partition("?")
        missing = f"{path.rsplit('/', 1)[0]}/no_such_database?{query}"
    monkeypatch.setenv("SHADOWPROXY_DATABASE_URL", missing)
    assert main(["migrate", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert "(from SHADOWPROXY_DATABASE_URL, which overrides database.url)" in err
    assert "create the database on the server, or correct its name in database.url" in err


def test_a_port_in_use_is_a_clear_error(tmp_path: Path, sync_database_url: str,
                                        capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A second proxy on a taken address stops with a message naming it, exit status 1."""
    monkeypatch.delenv("SHADOWPROXY_DATABASE_URL", raising=False)
    config, port, admin = write_config(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2",
                                       sync_database_url)
    for taken, key in ((port, "change `listen`"), (admin, "change `admin_listen`")):
        with socket.socket() as blocker:
            blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            blocker.bind(("127.0.0.1", taken))
            blocker.listen()
            assert main(["run", "-c", str(config)]) == 1
        err = capsys.readouterr().err
        assert f"cannot listen on 127.0.0.1:{taken}" in err and key in err


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("key", ["listen", "admin_listen"])
async def test_a_taken_port_exits_promptly_with_one_json_line(
        tmp_path: Path, database_url: str, workers: int, key: str) -> None:
    """A taken `listen` or `admin_listen` ends `run` within seconds with exit status 1 and one
    JSON log line naming the address, in single and worker mode, without starting workers."""
    config, port, admin = write_config(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2",
                                       database_url, workers=workers)
    taken = port if key == "listen" else admin
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shadowproxy", "run", "-c", str(config),
            "--log-format", "json", stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "SHADOWPROXY_DATABASE_URL": ""})
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 15)
        finally:
            if proc.returncode is None:
                proc.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 5)
    assert proc.returncode == 1
    lines = err.decode().splitlines()
    assert len(lines) == 1, lines
    event = json.loads(lines[0])
    assert event["level"] == "error"
    assert event["message"].startswith(f"cannot listen on 127.0.0.1:{taken} ({key})")
    assert f"change `{key}`" in event["message"]
    assert not list((tmp_path / "data").glob("run/worker-*"))  # no worker was started


@pytest.mark.slow
async def test_data_dir_is_private_whatever_the_umask(tmp_path: Path) -> None:
    """Under umask 000 (some container images and init systems start processes with it),
    the spool directory was made 0777 and its segments 0666: anyone on the host could read
    the records, or plant a pickle that the proxy loads when it replays the spool. The
    directories shadowproxy makes are 0700 and its files 0600, with workers too."""
    with socket.socket() as closed:  # a port nothing listens on: every record is spooled
        closed.bind(("127.0.0.1", 0))
        down = f"postgresql://u:pw@127.0.0.1:{closed.getsockname()[1]}/db"
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow:
        config, port, admin = write_config(tmp_path, primary.url, shadow.url, down,
                                           workers=2)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shadowproxy", "run", "-c", str(config),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "SHADOWPROXY_DATABASE_URL": ""},
            preexec_fn=lambda: os.umask(0))
        try:
            await wait_ready(admin, proc)
            async with aiohttp.ClientSession() as http:
                for _ in range(4):
                    async with aiohttp.ClientSession() as fresh:
                        await (await fresh.post(f"http://127.0.0.1:{port}/p", json={})).read()
                deadline = time.monotonic() + 10
                while not list((tmp_path / "data" / "spool").glob("*.spool")):
                    assert time.monotonic() < deadline, "nothing spooled"
                    await asyncio.sleep(0.05)
                await asyncio.sleep(1.5)  # the workers' snapshots, written every second
                assert (await http.get(f"http://127.0.0.1:{admin}/metrics")).status == 200
            modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777)
                     for p in [tmp_path / "data", *(tmp_path / "data").rglob("*")]}
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
    assert any(name.endswith(".pickle") for name in modes), modes
    assert {name: mode for name, mode in modes.items() if mode != (
        "0o700" if (tmp_path / name).is_dir() else "0o600")} == {}


@pytest.mark.parametrize("again", [signal.SIGINT, signal.SIGTERM])
async def test_the_signal_sent_again_while_the_stop_ends_leaves_exit_status_0(
        tmp_path: Path, database_url: str, again: signal.Signals) -> None:
    """SIGTERM, then the same kind of signal again and again until the process is gone (a
    second Ctrl-C, a supervisor repeating itself): the stop ends as it began, with exit
    status 0. One that arrived after the stop's last line, once the event loop had closed
    and given the signal its default action back, killed the process by that signal."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow:
        config, _, admin = write_config(tmp_path, primary.url, shadow.url, database_url)
        proc = await start(config)
        # Signalled through a pidfd, not proc.send_signal: Popen.send_signal polls first,
        # and a poll that reaps the exited process leaves asyncio's child watcher without
        # its status (it reports 255, "Unknown child process"), the test's own doing.
        pidfd = os.pidfd_open(proc.pid)
        try:
            await wait_ready(admin, proc)
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            while proc.returncode is None:
                await asyncio.sleep(0.002)
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, again)
            status = await asyncio.wait_for(proc.wait(), 30)
        finally:
            os.close(pidfd)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
        assert status == 0, err
        assert "stopped: served=0" in err


@pytest.mark.slow
async def test_an_edit_made_while_the_proxy_starts_is_applied_by_watch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`watch: true` compares the file with the content the running configuration was read
    from, not with what the file holds once the proxy serves: an edit made while it starts
    (here a database that does not answer holds the start for 3 s; the embedded database
    takes seconds too) is applied as soon as it serves."""
    from shadowproxy.config import load_config
    from shadowproxy.reload import config_version
    from tests.upstreams import unaccepting_listener

    monkeypatch.delenv("SHADOWPROXY_DATABASE_URL", raising=False)
    with unaccepting_listener() as silent:
        url = silent.replace("http://", "postgresql://nobody@") + "/none"
        config, _, admin = write_config(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2",
                                        url, watch=True, watch_interval_s=0.05,
                                        limits={"shutdown_grace_s": 1})
        proc = await start(config)
        async with aiohttp.ClientSession() as http:
            for _ in range(200):  # the admin listener answers (503) while the start goes on
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{admin}/readyz") as first:
                        if first.status == 503:
                            break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the admin listener did not answer while starting")
            config.write_text(config.read_text().replace("name: c", "name: c2"))
            edited = config_version(load_config(config))
            await wait_ready(admin, proc)
            detail: dict[str, object] = {}
            for _ in range(60):
                async with http.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                    detail = await resp.json()
                if detail.get("config_version") == edited:
                    break
                await asyncio.sleep(0.05)
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode(errors="replace")
    assert detail.get("config_version") == edited, log
    assert f"-> {edited}; route r: shadow c2 added, shadow c removed" in log
