"""`workers: N` as real processes: counters kept across replacements, no restart loop,
workers that die with their supervisor, and readiness that means listening."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import yaml

from tests.test_admin import samples
from tests.test_run_command import free_port, wait_ready, write_config
from tests.upstreams import model, serve

if TYPE_CHECKING:
    from shadowproxy.config import Settings

pytestmark = pytest.mark.slow


def worker_pids(supervisor: int) -> set[int]:
    """The live worker processes (multiprocessing spawn children) of ``supervisor``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == supervisor and fields[0] != "Z" and b"spawn_main" in cmdline:
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0] \
            != "Z"
    except OSError:
        return False


def listeners(port: int) -> int:
    """How many sockets listen on 127.0.0.1:``port`` (each worker has its own)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for r in rows if r[1] == want and r[3] == "0A")


async def total_requests(http: aiohttp.ClientSession, admin: int) -> float:
    text = await (await http.get(f"http://127.0.0.1:{admin}/metrics")).text()
    return samples(text).get(("shadowproxy_requests_total", (("code", "200"), ("route", "r"))),
                             0.0)


async def maintenance_runs(http: aiohttp.ClientSession, admin: int) -> float:
    text = await (await http.get(f"http://127.0.0.1:{admin}/metrics")).text()
    return samples(text).get(("shadowproxy_storage_maintenance_total", (("result", "ok"),)),
                             0.0)


async def send(port: int, n: int) -> None:
    for _ in range(n):
        # A new connection each time, so that the kernel spreads them over the workers.
        async with aiohttp.ClientSession() as fresh:
            resp = await fresh.post(f"http://127.0.0.1:{port}/p", json={})
            assert resp.status == 200
            await resp.read()


def _as_in_a_terminal() -> None:
    """In the child before exec: SIGINT's default action, as a shell in a terminal gives its
    commands (a test run in the background may have it ignored, which exec keeps)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.asynccontextmanager
async def supervisor(config: Path, *, log_format: str = "text", own_group: bool = False
                     ) -> AsyncIterator[asyncio.subprocess.Process]:
    """`shadowproxy run` with workers; afterwards every process it started is ended. With
    ``own_group`` it leads a process group of its own, as a command run in a terminal does
    (Ctrl-C signals the whole group)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shadowproxy", "run", "-c", str(config),
        "--log-format", log_format, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "SHADOWPROXY_DATABASE_URL": ""},
        start_new_session=own_group, preexec_fn=_as_in_a_terminal if own_group else None)
    assert proc.pid is not None
    seen: set[int] = set()
    try:
        yield proc
    finally:
        seen |= worker_pids(proc.pid)
        if proc.returncode is None:
            proc.kill()
        for pid in seen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_counters_never_go_backwards_when_workers_are_replaced(
        tmp_path: Path, database_url: str) -> None:
    """Each worker killed in turn is replaced, and the summed request counter never drops
    below what was answered: a dead worker's counts are kept (its storage maintenance
    runs too)."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow:
        config, port, admin = write_config(tmp_path, primary.url, shadow.url, database_url,
                                           workers=2,
                                           storage={"maintenance_interval_s": 0.2})
        async with supervisor(config) as proc, aiohttp.ClientSession() as http:
            await wait_ready(admin, proc)
            assert proc.pid is not None
            await send(port, 30)
            deadline = time.monotonic() + 5
            while await total_requests(http, admin) < 30 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            seen = [await total_requests(http, admin)]
            runs = [await maintenance_runs(http, admin)]
            for victim in sorted(worker_pids(proc.pid)):
                os.kill(victim, signal.SIGKILL)
                await wait_for(lambda v=victim: not alive(v), 5, "the worker to die")
                deadline = time.monotonic() + 20
                replaced = False
                while time.monotonic() < deadline and not replaced:
                    seen.append(await total_requests(http, admin))
                    runs.append(await maintenance_runs(http, admin))
                    ready = await http.get(f"http://127.0.0.1:{admin}/readyz")
                    replaced = ready.status == 200 and victim not in worker_pids(proc.pid)
                    await asyncio.sleep(0.1)
                assert replaced, "the worker was not replaced"
                await asyncio.sleep(1.5)  # the replacement has published its own counters
                seen.append(await total_requests(http, admin))
            await send(port, 10)
            deadline = time.monotonic() + 10  # each worker publishes its counts every second
            seen.append(await total_requests(http, admin))
            while seen[-1] < 40 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                seen.append(await total_requests(http, admin))
    assert seen[0] == 30
    assert all(b >= a for a, b in itertools.pairwise(seen)), seen
    assert seen[-1] == 40
    assert runs[0] > 0
    assert all(b >= a for a, b in itertools.pairwise(runs)), runs


async def test_a_worker_that_cannot_listen_is_retried_then_given_up(
        tmp_path: Path, database_url: str) -> None:
    """With the port taken from under the workers, they are retried with a growing wait and
    then given up: /healthz answers 503 meanwhile, the supervisor exits 1, and every line of
    its log is JSON, without a traceback, ending with one line that names the cause."""
    async with serve(model("v1")) as primary:
        config, port, admin = write_config(tmp_path, primary.url, primary.url + "/s",
                                           database_url, workers=2)
        async with supervisor(config, log_format="json") as proc, \
                aiohttp.ClientSession() as http:
            await wait_ready(admin, proc)
            assert proc.pid is not None
            workers = worker_pids(proc.pid)
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            with socket.socket() as blocker:
                blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                deadline = time.monotonic() + 5
                while True:  # take the port the moment the workers let it go
                    try:
                        blocker.bind(("127.0.0.1", port))
                        break
                    except OSError:
                        assert time.monotonic() < deadline, "the port was never released"
                        await asyncio.sleep(0.002)
                blocker.listen()
                health: set[int] = set()
                started = time.monotonic()
                while proc.returncode is None and time.monotonic() - started < 30:
                    with contextlib.suppress(aiohttp.ClientError):
                        health.add((await http.get(f"http://127.0.0.1:{admin}/healthz")).status)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.wait(), 0.2)
                took = time.monotonic() - started
                assert proc.stderr is not None
                err = (await asyncio.wait_for(proc.stderr.read(), 10)).decode()
    assert proc.returncode == 1
    assert 503 in health
    assert 2 < took < 20  # backed off (0.5 + 1 + 2 s), then gave up
    events = [json.loads(line) for line in err.splitlines()]  # every line is JSON
    assert "Traceback" not in err
    retries = [e for e in events if "retrying in" in e["message"]]
    assert 2 <= len(retries) <= 6
    final = [e for e in events if "giving up" in e["message"]]
    assert len(final) == 1
    assert f"cannot listen on 127.0.0.1:{port} (listen)" in final[0]["message"]


async def test_workers_die_with_their_supervisor(tmp_path: Path, database_url: str) -> None:
    """A supervisor killed with SIGKILL takes its workers with it: they stop within seconds
    and the port no longer accepts connections; each says why it stops (the kernel's
    SIGTERM left it unsaid)."""
    async with serve(model("v1")) as primary:
        config, port, admin = write_config(tmp_path, primary.url, primary.url + "/s",
                                           database_url, workers=2)
        async with supervisor(config) as proc:
            await wait_ready(admin, proc)
            assert proc.pid is not None
            workers = worker_pids(proc.pid)
            assert len(workers) == 2
            proc.kill()
            await wait_for(lambda: not any(alive(p) for p in workers), 10,
                           "the workers to stop")
            assert proc.stderr is not None
            err = (await asyncio.wait_for(proc.stderr.read(), 10)).decode()
    assert listeners(port) == 0
    for pid in workers:
        assert f"[{pid}]: the supervisor (pid {proc.pid}) is gone: stopping" in err, err


@pytest.mark.parametrize("signal_to", ["supervisor", "process group"])
async def test_a_stop_while_the_workers_start_exits_0_without_a_traceback(
        tmp_path: Path, database_url: str, signal_to: str) -> None:
    """SIGTERM to the supervisor, or Ctrl-C's SIGINT to the whole process group, while the
    workers are still starting up (importing, for about a second): every worker stops
    before it serves, none prints a traceback, and the supervisor logs no error and exits
    0. The workers died of the signal's default action, and the supervisor exited 1."""
    async with serve(model("v1")) as primary:
        config, port, _ = write_config(tmp_path, primary.url, primary.url + "/s",
                                       database_url, workers=2)
        async with supervisor(config, log_format="json",
                              own_group=signal_to == "process group") as proc:
            assert proc.pid is not None
            pid = proc.pid
            await wait_for(lambda: len(worker_pids(pid)) == 2, 10, "the workers to start")
            workers = worker_pids(pid)
            assert not list((tmp_path / "data" / "run").glob("worker-*.pickle")), \
                "a worker listened already: the stop did not come while it started"
            if signal_to == "supervisor":
                os.kill(pid, signal.SIGTERM)
            else:
                os.killpg(pid, signal.SIGINT)
            status = await asyncio.wait_for(proc.wait(), 30)
            assert proc.stderr is not None
            err = (await proc.stderr.read()).decode()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    events = [json.loads(line) for line in err.splitlines()]
    assert [e["message"] for e in events if e["level"] == "error"] == []
    assert status == 0
    assert not any(alive(p) for p in workers)
    assert listeners(port) == 0


async def test_ctrl_c_pressed_again_and_again_while_the_workers_stop_exits_0(
        tmp_path: Path, database_url: str) -> None:
    """Ctrl-C, then Ctrl-C again until the supervisor is gone (SIGINT to the whole process
    group): every worker's stop ends as it began, the supervisor logs no error and exits 0.
    A SIGINT that reached a worker after its stop's last line, once its event loop had
    closed, killed it, and the supervisor logged `worker 0 (pid N) exited with status -2
    during the stop` and exited 1."""
    async with serve(model("v1")) as primary:
        config, _, admin = write_config(tmp_path, primary.url, primary.url + "/s",
                                        database_url, workers=2)
        async with supervisor(config, log_format="json", own_group=True) as proc:
            await wait_ready(admin, proc)
            assert proc.pid is not None
            pid = proc.pid
            os.killpg(pid, signal.SIGINT)
            while proc.returncode is None:
                await asyncio.sleep(0.002)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGINT)
            status = await asyncio.wait_for(proc.wait(), 30)
            assert proc.stderr is not None
            err = (await proc.stderr.read()).decode()
    events = [json.loads(line) for line in err.splitlines()]
    assert [e["message"] for e in events if e["level"] == "error"] == []
    assert sum(e["message"].startswith("stopped: ") for e in events) == 2, err
    assert status == 0


async def test_readyz_waits_for_the_replacement_to_listen(
        tmp_path: Path, database_url: str) -> None:
    """After a worker dies, /readyz says 200 again only once its replacement listens."""
    async with serve(model("v1")) as primary:
        config, port, admin = write_config(tmp_path, primary.url, primary.url + "/s",
                                           database_url, workers=2)
        async with supervisor(config) as proc, aiohttp.ClientSession() as http:
            await wait_ready(admin, proc)
            assert proc.pid is not None
            assert listeners(port) == 2
            victim = min(worker_pids(proc.pid))
            os.kill(victim, signal.SIGKILL)
            await wait_for(lambda: listeners(port) == 1, 5, "the socket to close")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if (await http.get(f"http://127.0.0.1:{admin}/readyz")).status == 200:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("never ready again")
            assert listeners(port) == 2, "ready before the replacement listened"


def test_a_dead_workers_counters_are_kept_and_its_gauges_dropped() -> None:
    """Folding a worker's last snapshot into the retained total adds every counter (bodies
    withheld and storage maintenance runs included) and keeps none of its gauges."""
    from shadowproxy.metrics import Metrics
    from shadowproxy.workers import fold

    metrics = Metrics()
    metrics.route("r").count(200)
    metrics.shadow("r", "s").finish(None, 2.0)
    metrics.records["written"] += 3
    metrics.bodies_withheld["too_deep"] = 2
    metrics.shadow("r", "s").set_json_skipped = 1
    metrics.maintenance["ok"] += 5
    metrics.maintenance["failed"] += 1
    snap = metrics.snapshot()
    total = fold(fold({"requests": [], "latency": [], "shadow": [], "records": {}}, snap), snap)
    assert total["requests"] == [("r", 200, 2)]
    assert total["records"]["written"] == 6
    assert total["bodies_withheld"] == {"too_deep": 4}
    assert total["set_json_skipped"] == [("r", "s", 2)]
    assert total["maintenance"] == {"ok": 10, "failed": 2}
    assert dict(total["shadow"][0][2])["ok"] == 2
    assert total["queue"] == 0 and "database" not in total


def test_the_supervisor_adds_no_database_state_of_its_own(tmp_path: Path) -> None:
    """shadowproxy_database_up sums the workers' states only: the supervisor, whose own
    counters (its reloads) are exposed too, holds no database connection to count."""
    from shadowproxy.config import Settings
    from shadowproxy.metrics import families
    from shadowproxy.workers import Supervisor

    settings = Settings.model_validate({
        "workers": 2, "data_dir": str(tmp_path),
        "routes": [{"name": "r", "primary": {"url": "http://127.0.0.1:9"}}]})
    supervisor = Supervisor(settings, "postgresql://unused", "text")
    supervisor.metrics.reloads["applied"] += 1
    exposed = {sample.name: sample.value for family in families(supervisor.snapshots())
               for sample in family.samples if not sample.labels or
               sample.labels == {"result": "applied"}}
    assert exposed["shadowproxy_config_reloads_total"] == 1
    assert exposed["shadowproxy_database_up"] == 0


async def test_a_configuration_the_workers_cannot_build_is_not_handed_to_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor builds the routes a worker would before it writes the configuration
    for them: a failure there fails the reload (``rejected``, the running version kept),
    instead of every worker failing on its own while the reload said ``applied``. The
    failure is made at the seam, ``live.compile_routes``: the known ones (a host name that
    cannot be sent) are refused by validation first."""
    from shadowproxy import live
    from shadowproxy.config import Settings
    from shadowproxy.workers import CONFIG_FILE, Supervisor

    def route(url: str) -> dict[str, Any]:
        return {"name": "r", "primary": {"url": url}}

    settings = Settings.model_validate({"workers": 2, "data_dir": str(tmp_path),
                                        "routes": [route("http://127.0.0.1:9")]})
    supervisor = Supervisor(settings, "postgresql://unused", "text")
    supervisor.prepare()
    new = Settings.model_validate({"workers": 2, "data_dir": str(tmp_path),
                                   "routes": [route("http://127.0.0.1:10")]})
    def failing(*args: Any, **kwargs: Any) -> Any:
        raise UnicodeError("label empty or too long")

    monkeypatch.setattr(live, "compile_routes", failing)
    with pytest.raises(UnicodeError):
        await supervisor.apply(new, "v2")
    assert not (supervisor.directory / CONFIG_FILE).exists()
    assert supervisor.settings is settings
    monkeypatch.undo()
    await supervisor.apply(new, "v2")  # no worker listens: nothing to wait for
    assert (supervisor.directory / CONFIG_FILE).exists() and supervisor.version == "v2"


def test_a_stop_waits_for_a_worker_as_long_as_its_own_stop_can_take() -> None:
    """A worker's stop takes up to twice limits.shutdown_grace_s (docs/operations.md): the
    supervisor kills one only after that and a margin, since a killed worker loses what is
    still in memory."""
    from shadowproxy.workers import stop_timeout_s

    for grace in (1.0, 10.0, 20.0, 60.0):
        assert stop_timeout_s(grace) >= 2 * grace + 10


@contextlib.asynccontextmanager
async def _two_workers(tmp_path: Path, database_url: str
                       ) -> AsyncIterator[tuple[Path, asyncio.subprocess.Process, int, Path]]:
    """A supervisor of two workers, ready and seen listening: its configuration file, the
    process, one worker's pid (to stall) and the file a reload hands its version on in."""
    async with serve(model("v1")) as primary:
        config, _, admin = write_config(tmp_path, primary.url, primary.url + "/s",
                                        database_url, workers=2)
        async with supervisor(config) as proc:
            await wait_ready(admin, proc)
            assert proc.pid is not None
            await asyncio.sleep(0.5)  # the supervisor's round (0.1 s) has seen both listen
            yield (config, proc, min(worker_pids(proc.pid)),
                   tmp_path / "data" / "run" / "config.json")


async def test_reload_commands_answer_with_the_reload_that_read_their_edit(
        tmp_path: Path, database_url: str) -> None:
    """Two `shadowproxy reload` run while another reload is still applying (a worker slow
    to follow it) both answer with the reload that read the file as they found it: the
    earlier reload's outcome, from before their edit, or the ``unchanged`` of the second
    reload their two signals made, was printed instead."""
    from shadowproxy.config import load_config
    from shadowproxy.control import request_reload
    from shadowproxy.reload import config_version

    async with _two_workers(tmp_path, database_url) as (config, proc, slow, handed):
        def edit(grace: float) -> str:
            text = yaml.safe_load(config.read_text())
            text["limits"] = {"shutdown_grace_s": grace}
            config.write_text(yaml.safe_dump(text))
            return config_version(load_config(config))

        os.kill(slow, signal.SIGSTOP)
        try:
            first = edit(4)
            os.kill(proc.pid, signal.SIGHUP)  # waits for the stopped worker
            await wait_for(lambda: handed.exists() and first in handed.read_text(), 10,
                           "the first reload to hand its version on")
            second = edit(5)
            # The command's own code, in threads: each signals within milliseconds.
            commands = [asyncio.ensure_future(asyncio.to_thread(request_reload, config))
                        for _ in range(2)]
            await asyncio.sleep(1)  # both have signalled; the first reload still waits
            assert not any(c.done() for c in commands)
        finally:
            os.kill(slow, signal.SIGCONT)
        outcomes = [await asyncio.wait_for(c, 30) for c in commands]
    for outcome in outcomes:
        assert (outcome["result"], outcome["previous_version"], outcome["version"]) == \
            ("applied", first, second)


async def test_a_worker_whose_snapshot_cannot_be_written_for_a_while_is_ready_again(
        tmp_path: Path, database_url: str) -> None:
    """A worker that cannot write its snapshot (a full disk, here a directory in the way of
    its file) is not ready meanwhile, and ready again once it can: its publisher died at the
    first failure, and the worker served on for good with /readyz at 503."""
    async with serve(model("v1")) as primary:
        config, _, admin = write_config(tmp_path, primary.url, primary.url + "/s",
                                        database_url, workers=2)
        async with supervisor(config) as proc, aiohttp.ClientSession() as http:
            await wait_ready(admin, proc)
            assert proc.pid is not None
            blocked = tmp_path / "data" / "run" / f"worker-{min(worker_pids(proc.pid))}.tmp"
            blocked.mkdir()
            statuses: list[int] = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and 503 not in statuses:
                statuses.append((await http.get(f"http://127.0.0.1:{admin}/readyz")).status)
                await asyncio.sleep(0.1)
            assert 503 in statuses, "the worker's stale snapshot still counted as ready"
            blocked.rmdir()
            await wait_ready(admin, proc)


async def test_a_watched_edit_the_workers_cannot_be_handed_is_retried_until_it_applies(
        tmp_path: Path, database_url: str) -> None:
    """With ``watch: true``, a valid edit whose reload fails to apply (the supervisor cannot
    write its workers' configuration: a full disk, here a directory in the way of its file)
    is tried again, backing off, and applied once the file can be written; the failure is
    logged once, not at every try, and so is its end. It was counted as loaded and never
    tried again until the next edit, the workers left on the old version."""
    from shadowproxy.config import load_config
    from shadowproxy.reload import config_version

    async with serve(model("v1")) as primary:
        config, _, admin = write_config(tmp_path, primary.url, primary.url + "/s",
                                        database_url, workers=2, watch=True,
                                        watch_interval_s=0.1)
        async with supervisor(config) as proc:
            await wait_ready(admin, proc)
            assert proc.stderr is not None
            said: list[str] = []

            async def read_log() -> None:
                assert proc.stderr is not None
                async for line in proc.stderr:
                    said.append(line.decode(errors="replace"))

            reading = asyncio.ensure_future(read_log())
            handed = tmp_path / "data" / "run" / "config.json"
            blocked = handed.with_name(handed.name + ".tmp")
            blocked.mkdir()
            text = yaml.safe_load(config.read_text())
            text["limits"] = {"shutdown_grace_s": 4}
            config.write_text(yaml.safe_dump(text))
            version = config_version(load_config(config))
            await wait_for(lambda: any("could not be applied" in line for line in said), 10,
                           "the reload to fail")
            await asyncio.sleep(2)  # several tries, each failing alike
            assert not handed.exists() or version not in handed.read_text()
            blocked.rmdir()
            await wait_for(lambda: handed.exists() and version in handed.read_text(), 10,
                           "the edit to be handed to the workers")
            await wait_for(lambda: any("applied at last" in line for line in said), 5,
                           "the log to say the edit applied")
            reading.cancel()
    failed = [line for line in said if "could not be applied" in line]
    assert len(failed) == 1, failed
    assert not any("Traceback" in line for line in said)


async def test_a_reload_command_sent_to_a_stopping_supervisor_says_so_when_it_exits(
        tmp_path: Path, database_url: str) -> None:
    """`shadowproxy reload` that signals a supervisor whose stop has begun (it takes no
    reload then) says that the proxy stopped without reloading as soon as it is gone: it
    waited for an outcome until its timeout, and then said only that none came. The
    command read the process file just before the stop removed it: the test puts it back
    (a hard link), and a stalled worker holds the stop meanwhile."""
    from shadowproxy.control import PROCESS_FILE, request_reload
    from shadowproxy.errors import ShadowProxyError

    async with _two_workers(tmp_path, database_url) as (config, proc, slow, handed):
        process_file = handed.parent / PROCESS_FILE
        as_read = handed.parent / "process-as-read"
        os.link(process_file, as_read)
        os.kill(slow, signal.SIGSTOP)
        try:
            config.write_text(config.read_text() + "limits: {shutdown_grace_s: 2}\n")
            os.kill(proc.pid, signal.SIGHUP)  # a reload that waits for the stopped worker
            await wait_for(handed.exists, 10, "the reload to hand its version on")
            os.kill(proc.pid, signal.SIGTERM)  # the stop waits for the stopped worker
            await wait_for(lambda: not process_file.exists(), 10, "the stop to begin")
            os.link(as_read, process_file)
            command = asyncio.ensure_future(asyncio.to_thread(request_reload, config, 25))
            await asyncio.sleep(1)
        finally:
            os.kill(slow, signal.SIGCONT)
        began = time.monotonic()
        with pytest.raises(ShadowProxyError, match="stopped without reloading"):
            await asyncio.wait_for(command, 30)
        took = time.monotonic() - began
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    assert took < 15


async def test_healthz_says_503_only_for_a_worker_that_fails_to_start(
        tmp_path: Path, database_url: str) -> None:
    """/healthz is the liveness probe: a worker that had served for ``STABLE_S`` and is
    killed is replaced at once with /healthz at 200 all along (the supervisor does its
    job); a worker that dies within ``STABLE_S`` of listening counts as a failed start,
    and /healthz says 503 until its replacement listens (docs/operations.md)."""
    from shadowproxy.workers import STABLE_S

    async with serve(model("v1")) as primary:
        config, _, admin = write_config(tmp_path, primary.url, primary.url + "/s",
                                           database_url, workers=2)
        async with supervisor(config) as proc, aiohttp.ClientSession() as http:
            await wait_ready(admin, proc)
            assert proc.pid is not None
            pid = proc.pid
            await asyncio.sleep(STABLE_S + 0.5)

            old = worker_pids(pid)
            victim = min(old)
            os.kill(victim, signal.SIGKILL)
            await wait_for(lambda: not alive(victim), 5, "the worker to die")
            seen: set[int] = set()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                seen.add((await http.get(f"http://127.0.0.1:{admin}/healthz")).status)
                ready = await http.get(f"http://127.0.0.1:{admin}/readyz")
                if ready.status == 200 and victim not in worker_pids(pid):
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the worker was not replaced")
            assert seen == {200}, "replacing a worker that had served counted as failing"
            old.discard(victim)
            young = (worker_pids(pid) - old).pop()
            os.kill(young, signal.SIGKILL)
            await wait_for(lambda: not alive(young), 5, "the worker to die")
            statuses: set[int] = set()
            deadline = time.monotonic() + 20
            while not worker_pids(pid) - old - {young} and time.monotonic() < deadline:
                statuses.add((await http.get(f"http://127.0.0.1:{admin}/healthz")).status)
                await asyncio.sleep(0.02)
            assert 503 in statuses, "a worker that died young counted as healthy"
            (replacement,) = worker_pids(pid) - old - {young}
            snapshot = tmp_path / "data" / "run" / f"worker-{replacement}.pickle"
            while not snapshot.exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
            # At once, as /readyz does: it said ready up to a supervisor round (0.1 s)
            # before /healthz stopped saying 503.
            assert (await http.get(f"http://127.0.0.1:{admin}/healthz")).status == 200


async def test_a_reload_waits_for_a_worker_that_listened_since_the_last_round(
        tmp_path: Path, database_url: str) -> None:
    """A reload that comes after a (re)started worker published that it listens, but before
    the supervisor's next round (``_POLL_S``) saw it, waits for that worker too and answers
    with it on the new version. It skipped the worker and answered at once, listing it on
    the old version. Real worker processes; the supervisor's rounds are run by hand, so
    that the reload lands in that window every time."""
    from shadowproxy.reload import config_version
    from shadowproxy.workers import Supervisor

    running = _one_worker(tmp_path, database_url, grace=5)
    sup = Supervisor(running, database_url, "text")
    sup.prepare()
    try:
        assert sup.check()  # starts the worker
        proc = sup.slots[0].proc
        assert proc is not None and proc.pid is not None
        snapshot = sup.directory / f"worker-{proc.pid}.pickle"
        await wait_for(snapshot.exists, 30, "the worker to listen")  # no round sees it
        assert not sup.slots[0].listening
        new = running.model_copy(update={"limits": _one_worker(tmp_path, database_url,
                                                               grace=6).limits})
        version = config_version(new)
        versions = await sup.apply(new, version)
        assert versions == [{"worker": 0, "pid": proc.pid, "config_version": version}]
    finally:
        await sup.stop_all()


async def test_a_stop_during_a_reload_that_waits_for_a_worker_begins_at_once(
        tmp_path: Path, database_url: str) -> None:
    """SIGTERM while a reload waits for a worker slow to follow it: /readyz says 503 at
    once and the other workers stop (the reload answers with the versions as they are).
    The stop waited for the reload's whole wait (10 s), /readyz saying ready and every
    worker accepting clients all along."""
    async with _two_workers(tmp_path, database_url) as (config, proc, slow, handed):
        admin = yaml.safe_load(config.read_text())["admin_listen"].rpartition(":")[2]
        others = worker_pids(proc.pid) - {slow}
        os.kill(slow, signal.SIGSTOP)
        try:
            config.write_text(config.read_text() + "limits: {shutdown_grace_s: 2}\n")
            os.kill(proc.pid, signal.SIGHUP)  # a reload that waits for the stopped worker
            await wait_for(handed.exists, 10, "the reload to hand its version on")
            os.kill(proc.pid, signal.SIGTERM)
            await asyncio.sleep(0.3)
            async with aiohttp.ClientSession() as http:
                ready = await http.get(f"http://127.0.0.1:{admin}/readyz")
                assert ready.status == 503 and (await ready.json())["state"] == "stopping"
            await wait_for(lambda: not any(alive(p) for p in others), 5,
                           "the other worker to stop")
        finally:
            os.kill(slow, signal.SIGCONT)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_a_reload_while_a_worker_starts_lists_it_as_starting(
        tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A reload that comes while a worker is still starting (not listening yet) lists that
    worker as starting, and the command says that it loads the new version once it listens
    (which it then does). The answer left the worker out: `applied` with no word of it.
    Real worker processes; the supervisor's rounds are run by hand."""
    from shadowproxy.control import print_outcome
    from shadowproxy.reload import config_version
    from shadowproxy.workers import Supervisor

    running = _one_worker(tmp_path, database_url, grace=5)
    sup = Supervisor(running, database_url, "text")
    sup.prepare()
    try:
        assert sup.check()  # starts the worker: it takes about a second to listen
        proc = sup.slots[0].proc
        assert proc is not None and proc.pid is not None
        new = running.model_copy(update={"limits": _one_worker(tmp_path, database_url,
                                                               grace=6).limits})
        version = config_version(new)
        versions = await sup.apply(new, version)
        assert not sup.slots[0].listening
        assert versions == [{"worker": 0, "pid": proc.pid, "config_version": None,
                             "starting": True}]
        assert print_outcome({"result": "applied", "version": version,
                              "previous_version": "old", "workers": versions}) == 0
        assert (f"  worker 0 (pid {proc.pid}): starting; it runs version {version} once "
                "it listens") in capsys.readouterr().out

        async def follows() -> bool:
            sup.check()  # notices it listening and signals it with the new version
            return sup.worker_versions() == [
                {"worker": 0, "pid": proc.pid, "config_version": version}]
        deadline = time.monotonic() + 30
        while not await follows():
            assert time.monotonic() < deadline, sup.worker_versions()
            await asyncio.sleep(0.05)
    finally:
        await sup.stop_all()


def _one_worker(tmp_path: Path, database_url: str, *, grace: float) -> Settings:
    """Settings of one worker for a Supervisor driven by hand (its rounds run by the test),
    on a free port, with the shutdown grace given: a reload changes only that."""
    from shadowproxy.config import Settings

    return Settings.model_validate({
        "workers": 1, "data_dir": str(tmp_path / "data"), "admin_listen": None,
        "listen": f"127.0.0.1:{free_port()}", "database": {"url": database_url},
        "limits": {"shutdown_grace_s": grace},
        "routes": [{"name": "r", "primary": {"url": "http://127.0.0.1:9"}}]})
