"""``workers: N``: a supervisor process that starts, watches and replaces N worker processes.

Each worker runs a whole proxy (``app.running``) and binds ``listen`` with SO_REUSEPORT, so
the kernel spreads connections over them; the supervisor serves the admin endpoints from
the snapshots the workers publish every second in ``data_dir/run/worker-PID.pickle``. It
fails safe in four ways:

- **Counters never go backwards.** When a worker exits, its last snapshot (written at a
  graceful stop, or up to a second old after a crash) is folded into a retained total that
  /metrics keeps adding, as prometheus_client's multiprocess mode keeps a dead process's
  files; a replacement starts from zero beside it.
- **No restart loop.** A worker that exits before its snapshot says it listens failed to
  start (a taken port, say): it is retried after 0.5, 1 and 2 s, with one log line each
  naming the cause; at the fourth failure in a row the supervisor logs one line, stops the
  other workers and exits 1. Meanwhile /healthz answers 503. A worker that had listened for
  ``STABLE_S`` is replaced at once; one that dies sooner counts as a failed start, so that
  a worker that crashes right after starting is not restarted forever either.
- **Workers die with the supervisor.** On Linux each worker asks the kernel for
  ``PARENT_GONE_SIGNAL`` when its parent dies (``prctl(PR_SET_PDEATHSIG)``), and every
  worker also checks its parent's pid twice a second (other systems, and the moment before
  the prctl call): a worker whose supervisor is gone says so, drains and exits.
- **Ready means listening.** /readyz says ready only when every slot's current process has
  published a snapshot in the last 3 s saying that it listens and is ready.

A stop (SIGTERM/SIGINT) stops the reloader, passes SIGTERM on to every worker, waits for
each to drain (one still running ``stop_timeout_s``, twice ``limits.shutdown_grace_s`` and
15 s, later is killed), and closes the admin listener last. A worker still starting up
then exits 0 before it serves: it holds SIGTERM and SIGINT blocked until it handles them.

A reload (SIGHUP, ``POST /-/reload``, ``shadowproxy reload``, ``watch: true``) is the
supervisor's: it validates the file once (``reload.Reloader``), writes the configuration to
apply to ``data_dir/run/config.json`` and sends each worker SIGHUP; a worker reads that file
(never the config file itself, which may have changed again meanwhile), applies it as a
single proxy does and publishes its snapshot at once. Each snapshot names the worker's
version: the reload answers when every listening worker runs it, /readyz lists each
worker's version, and a worker that runs another version (one that was starting during the
reload) is signalled again, once a second, until it does. A replacement starts with the
current configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from shadowproxy import control
from shadowproxy.config import Settings
from shadowproxy.cycles import collected_in_the_background
from shadowproxy.errors import ShadowProxyError
from shadowproxy.logs import setup_logging
from shadowproxy.metrics import Metrics
from shadowproxy.private import open_private, private_directory
from shadowproxy.reload import Reloader, ReloadOutcome, config_version
from shadowproxy.tasks import spawn

log = logging.getLogger("shadowproxy")

SNAPSHOT_INTERVAL_S = 1.0
FRESH_S = 3.0
"""A snapshot older than this no longer counts as the worker's word."""
MAX_START_FAILURES = 4
"""Consecutive failed starts of one worker after which the supervisor gives up."""
FIRST_RETRY_S = 0.5
"""Wait before the first retry of a failed start; doubled for each one after."""
STABLE_S = 10.0
"""A worker that dies after listening this long is replaced at once, failures forgotten."""
_PARENT_CHECK_S = 0.5
_POLL_S = 0.1
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
CONFIG_FILE = "config.json"
"""In ``data_dir/run``: the configuration the workers are to run, written by a reload."""
RESIGNAL_S = 1.0
"""A worker still on another version is sent SIGHUP again after this long."""
RELOAD_WAIT_S = 10.0
"""How long a reload waits for every listening worker to report the new version."""


def stop_timeout_s(grace_s: float) -> float:
    """How long a stop waits for a worker before killing it: a worker's own stop takes up
    to twice the grace (requests and shadow calls, then the database taking its queue and
    spool; docs/operations.md), and a killed worker loses what is still in memory."""
    return 2 * grace_s + 15
PARENT_GONE_SIGNAL = signal.SIGUSR1
"""What the kernel sends a worker when its supervisor dies (Linux). Not SIGTERM: that came
as the supervisor's first thread ended, while its pid still was the worker's parent's, so
the worker could not tell it from the supervisor's own stop, and stopped unexplained."""
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, PARENT_GONE_SIGNAL}
"""Blocked in a worker from its first instruction until it handles them (``_start``)."""


# --- the worker process -------------------------------------------------------------------

def _die_with_parent(parent: int) -> None:
    """``PARENT_GONE_SIGNAL`` from the kernel when the supervisor dies (Linux); exit if it
    already has."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, PARENT_GONE_SIGNAL,
                                                    0, 0, 0)
    if os.getppid() != parent:
        raise SystemExit(0)


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    # The supervisor unpickles it: this user's alone (private.py).
    try:
        with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:
            f.write(pickle.dumps(data))
        tmp.replace(path)  # atomic, so the supervisor never reads half a file
    except BaseException:
        tmp.unlink(missing_ok=True)  # (half written, on a full disk)
        raise


def _write_error(directory: Path, message: str) -> None:
    """Leave the supervisor why this worker failed (it reports it, with its retry); on a
    full disk the log has it only: a second traceback, for the file, hid the first."""
    path = directory / f"worker-{os.getpid()}.error"
    try:
        path.write_text(message)
    except OSError as exc:
        path.unlink(missing_ok=True)
        log.error("cannot write %s (%s): %s", path, exc.strerror or exc, message)


def worker_main(settings: Settings, url: str, log_format: str, index: int, parent: int,
                directory: Path) -> None:
    """A worker process's entry point (``multiprocessing`` spawn target)."""
    # Until its handler is installed, a SIGHUP (a terminal's hangup reaches the whole
    # process group) must not end a starting worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _die_with_parent(parent)
    setup_logging(log_format)
    os.environ["SHADOWPROXY_WORKER"] = str(index)
    from shadowproxy.runner import run_loop, stopped

    status = 1
    try:
        # A Ctrl-C reaches the workers too: pressed twice, it killed a worker whose stop was
        # over, and the supervisor reported that worker as failed (exit status 1).
        status = stopped(run_loop(_worker(settings, url, parent, directory)))
    except ShadowProxyError as exc:
        # The supervisor reports it, with its retry, as one line in the log format.
        _write_error(directory, str(exc))
    except Exception as exc:
        log.exception("worker %d failed", index)
        _write_error(directory, repr(exc))
    finally:
        # The loop's end gave it its default action back, which ends the process: the
        # kernel sends it again as the supervisor's last thread ends, after its first.
        signal.signal(PARENT_GONE_SIGNAL, signal.SIG_IGN)
    raise SystemExit(status)


PASSED_ON = {"database", "admin_token"}
"""Restart-only settings that may hold secrets: never written to the hand-off file (a
worker keeps its own, which are the same)."""


def _read_config(directory: Path, running: Settings) -> tuple[Settings, str] | None:
    """The configuration the supervisor handed on, with this worker's own values of
    ``PASSED_ON``; None if there is none (a SIGHUP that was not the supervisor's)."""
    try:
        text = (directory / CONFIG_FILE).read_text()
    except FileNotFoundError:
        return None
    data = json.loads(text)
    own = running.model_dump(mode="json", include=PASSED_ON)
    return Settings.model_validate({**data["settings"], **own}), str(data["version"])


async def _worker(settings: Settings, url: str, parent: int, directory: Path) -> int:
    from shadowproxy.app import running
    from shadowproxy.runner import stop_event

    stop = stop_event()
    loop = asyncio.get_running_loop()
    told: list[bool] = []

    def parent_gone() -> None:
        if not told:
            told.append(True)
            log.warning("the supervisor (pid %d) is gone: stopping", parent)
        stop.set()

    loop.add_signal_handler(PARENT_GONE_SIGNAL, parent_gone)
    # The supervisor started this process with STOP_SIGNALS blocked (``Supervisor._start``):
    # one that came while it started up (the supervisor's stop, Ctrl-C in a terminal, the
    # kernel's signal for a dead supervisor) waits here, and means stop before serving.
    if signal.sigpending() & STOP_SIGNALS:
        return 0
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    path = directory / f"worker-{os.getpid()}.pickle"
    async with (running(settings, url, serve_admin=False, reuse_port=True) as proxy,
                collected_in_the_background()):

        unwritten: list[OSError] = []
        """The error of the last snapshot not written, if it was not (logged once)."""

        async def publish_once() -> None:
            ready, detail = await proxy.readiness()
            try:
                _write(path, {"metrics": proxy.metrics.snapshot(), "listening": True,
                              "ready": ready, "detail": detail, "pid": os.getpid(),
                              "time": time.time(), "config_version": proxy.version})
            except OSError as exc:
                # A full disk, say: the next second tries again. Ending the publisher
                # left the worker serving for good unseen: never ready again, its
                # counters stuck, every reload waiting for it.
                if not unwritten:
                    log.error("cannot write this worker's snapshot %s: %s; the supervisor "
                              "counts it as not ready until it can (tried every second)",
                              path, exc)
                unwritten[:] = [exc]
                return
            if unwritten:
                log.info("this worker's snapshot %s is written again", path)
                unwritten.clear()

        async def publish() -> None:
            while True:
                await publish_once()
                await asyncio.sleep(SNAPSHOT_INTERVAL_S)

        following = asyncio.Lock()

        async def follow() -> None:
            """SIGHUP from the supervisor: run the configuration it wrote."""
            async with following:
                try:
                    handed = await loop.run_in_executor(None, _read_config, directory,
                                                        proxy.settings)
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    log.error("cannot read the configuration to reload from %s: %s",
                              directory / CONFIG_FILE, exc)
                    return
                if handed is None:
                    log.info("SIGHUP: no configuration handed on by the supervisor; a "
                             "reload is the supervisor's (signal pid %d)", parent)
                    return
                new, version = handed
                if version != proxy.version:
                    previous = proxy.version
                    proxy.apply(new, version)
                    log.info("config reloaded: version %s -> %s", previous, version)
                await publish_once()  # tell the supervisor at once

        # Before the first snapshot: a worker that says it listens can take a SIGHUP.
        loop.add_signal_handler(signal.SIGHUP, lambda: spawn(follow(), name="config-follow"))

        async def watch_parent() -> None:
            while os.getppid() == parent:
                await asyncio.sleep(_PARENT_CHECK_S)
            parent_gone()

        publisher = spawn(publish(), name="metrics-publisher")
        watcher = spawn(watch_parent(), name="parent-watch")
        await stop.wait()
        publisher.cancel()
        watcher.cancel()
    # The final counts, for the supervisor's retained total.
    try:
        _write(path, {"metrics": proxy.metrics.snapshot(), "listening": False, "ready": False,
                      "detail": {}, "pid": os.getpid(), "time": time.time(),
                      "config_version": proxy.version})
    except OSError as exc:
        # A full disk: the stop is clean all the same (it failed the worker, exit status
        # 1, after its drain had stored or spooled every record).
        log.error("cannot write this worker's final snapshot %s: %s; the supervisor keeps "
                  "the counts it last published", path, exc)
    return 0


# --- counters of workers that are gone ----------------------------------------------------

def empty_snapshot() -> dict[str, Any]:
    return {"requests": [], "latency": [], "shadow": [], "records": {}, "queue": 0}


def fold(total: dict[str, Any], snap: dict[str, Any]) -> dict[str, Any]:
    """``total`` plus the counters of ``snap`` (a ``Metrics.snapshot``); gauges are dropped,
    since a worker that is gone holds nothing in its queue any more."""
    requests: dict[tuple[str, int], int] = {}
    for route, code, n in (*total["requests"], *snap["requests"]):
        requests[(route, code)] = requests.get((route, code), 0) + n
    latency: dict[tuple[str, str], tuple[list[int], float]] = {}
    for route, target, counts, sum_ms in (*total["latency"], *snap["latency"]):
        old = latency.get((route, target))
        latency[(route, target)] = (list(counts), sum_ms) if old is None else (
            [a + b for a, b in zip(old[0], counts, strict=True)], old[1] + sum_ms)
    shadow: dict[tuple[str, str], dict[str, int]] = {}
    for route, name, outcomes in (*total["shadow"], *snap["shadow"]):
        acc = shadow.setdefault((route, name), {})
        for outcome, n in outcomes.items():
            acc[outcome] = acc.get(outcome, 0) + n
    records = dict(total["records"])
    for outcome, n in snap["records"].items():
        records[outcome] = records.get(outcome, 0) + n
    withheld = dict(total.get("bodies_withheld", {}))
    for reason, n in snap.get("bodies_withheld", {}).items():
        withheld[reason] = withheld.get(reason, 0) + n
    skipped: dict[tuple[str, str], int] = {}
    for route, name, n in (*total.get("set_json_skipped", ()),
                           *snap.get("set_json_skipped", ())):
        skipped[(route, name)] = skipped.get((route, name), 0) + n
    # Each worker runs its own storage maintenance task and counts its runs.
    maintenance = dict(total.get("maintenance", {}))
    for result, n in snap.get("maintenance", {}).items():
        maintenance[result] = maintenance.get(result, 0) + n
    return {"requests": [(r, c, n) for (r, c), n in requests.items()],
            "latency": [(r, t, c, s) for (r, t), (c, s) in latency.items()],
            "shadow": [(r, s, o) for (r, s), o in shadow.items()],
            "records": records, "queue": 0, "bodies_withheld": withheld,
            "set_json_skipped": [(r, s, n) for (r, s), n in skipped.items()],
            "maintenance": maintenance}


# --- the supervisor -----------------------------------------------------------------------

@dataclass
class _Slot:
    """One of the N workers, across its replacements."""

    index: int
    proc: BaseProcess | None = None
    listening: bool = False
    """The current process has published a snapshot saying that it listens."""
    listening_since: float = 0.0
    failures: int = 0
    """Starts in a row that ended before listening, or within ``STABLE_S`` of it."""
    error: str = ""
    next_start: float = 0.0


def _trial_build(settings: Settings, version: str) -> None:
    """Build what a worker builds from ``settings`` (``Proxy.apply``: the routes and their
    pools, the recording rules), and throw it away. Raises what a worker would: a
    configuration the workers cannot run is then refused as in one process (the reload
    says ``rejected``), where each worker failed on its own, kept the old configuration and
    was signalled again every second, while the reload said ``applied``."""
    from shadowproxy.live import PoolRegistry, compile_routes
    from shadowproxy.recorder.rows import RowEncoder

    registry = PoolRegistry(asyncio.get_running_loop())
    try:
        compile_routes(settings, version, registry, Metrics())
        RowEncoder(settings.recording)
    finally:
        registry.close()


class Supervisor:
    """Starts the workers and keeps them running; the admin endpoints read it."""

    def __init__(self, settings: Settings, url: str, log_format: str) -> None:
        self.settings = settings
        """The running configuration: what a replacement worker starts with."""
        self.version = config_version(settings)
        self.metrics = Metrics()
        """The supervisor's own counters (reloads); the workers count the traffic."""
        self.reloader: Reloader | None = None
        self._signalled: dict[int, float] = {}
        """When each worker was last sent SIGHUP, by pid."""
        self.url = url
        self.log_format = log_format
        self.directory = settings.data_dir / "run"
        self.slots = [_Slot(i) for i in range(settings.workers)]
        self.retained = empty_snapshot()
        self.stopping = False
        """Set at the stop's first step: no replacements, /readyz 503, no reload waits."""
        self.gave_up = False
        self._ctx = multiprocessing.get_context("spawn")

    def prepare(self) -> None:
        private_directory(self.directory)
        for old in self.directory.glob("worker-*"):
            old.unlink()
        (self.directory / CONFIG_FILE).unlink(missing_ok=True)

    # --- what the admin endpoints show ---
    def _snapshot(self, pid: int | None) -> dict[str, Any] | None:
        if pid is None:
            return None
        try:
            snap: dict[str, Any] = pickle.loads(
                (self.directory / f"worker-{pid}.pickle").read_bytes())
        except (FileNotFoundError, EOFError, pickle.UnpicklingError):
            return None
        return snap

    def _live(self) -> list[tuple[_Slot, dict[str, Any] | None]]:
        return [(slot, self._snapshot(slot.proc.pid) if slot.proc is not None else None)
                for slot in self.slots]

    def snapshots(self) -> list[dict[str, Any]]:
        """The retained total of workers that are gone, the supervisor's own counters (its
        reloads) and each live worker's counters."""
        own = self.metrics.snapshot()
        del own["database"]  # the workers hold the database connections, not the supervisor
        return [self.retained, own] + [
            snap["metrics"] for _, snap in self._live() if snap is not None]

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        now = time.time()
        fresh = []
        for slot, snap in self._live():
            alive = slot.proc is not None and slot.proc.is_alive()
            if alive and snap is not None and snap["listening"] and \
                    now - snap["time"] < FRESH_S:
                fresh.append(snap)
        ready = (not self.stopping and len(fresh) == len(self.slots)
                 and all(s["ready"] for s in fresh))
        detail = {"workers": sum(1 for s in self.slots
                                 if s.proc is not None and s.proc.is_alive()),
                  "workers_listening": len(fresh),
                  "workers_configured": len(self.slots),
                  "database": sorted({str(s["detail"].get("database")) for s in fresh}),
                  "config_version": self.version,
                  "workers_config": self.worker_versions()}
        if self.reloader is not None and self.reloader.restart_needed:
            detail["restart_needed"] = self.reloader.restart_needed
        if self.stopping:
            detail["state"] = "stopping"
        return ready, detail

    def worker_versions(self) -> list[dict[str, Any]]:
        """Each live worker's configuration version, as its last snapshot says; a worker
        not listening yet (starting, or to be replaced) as ``"starting": true``, with no
        version: it runs the current one once it listens (a replacement starts with it, one
        started before a reload is signalled again). A reload's answer left it out."""
        out: list[dict[str, Any]] = []
        for slot, snap in self._live():
            proc = slot.proc
            if snap is not None and proc is not None and proc.is_alive():
                out.append({"worker": slot.index, "pid": snap["pid"],
                            "config_version": snap.get("config_version")})
            elif not self.stopping:
                out.append({"worker": slot.index, "pid": None if proc is None else proc.pid,
                            "config_version": None, "starting": True})
        return out

    # --- reloads ---
    async def apply(self, settings: Settings, version: str) -> list[dict[str, Any]]:
        """Pass a validated configuration on to every worker; each one's version once every
        listening worker runs it (or ``RELOAD_WAIT_S`` passed)."""
        _trial_build(settings, version)
        data = {"version": version,
                "settings": settings.model_dump(mode="json", exclude=PASSED_ON)}
        control.write_private(self.directory / CONFIG_FILE, json.dumps(data))
        self.settings, self.version = settings, version
        self._signalled.clear()
        self._signal_stale()
        deadline = time.monotonic() + RELOAD_WAIT_S
        # Not past a stop's beginning: the stop waits for this reload before it tells the
        # workers to stop (``supervise``), and waited out the rest of RELOAD_WAIT_S for a
        # slow worker while every worker went on accepting clients.
        while time.monotonic() < deadline and not self.stopping:
            for slot in self.slots:
                self._notice_listening(slot, time.monotonic())
            if all(snap is None or snap.get("config_version") == version
                   for slot, snap in self._live() if slot.listening):
                break
            await asyncio.sleep(0.02)
        else:
            if self.stopping:
                log.info("stopping: not waiting for every worker to report version %s",
                         version)
            else:
                log.warning("not every worker reported version %s within %.0f s; they "
                            "are signalled again until they do", version, RELOAD_WAIT_S)
        return self.worker_versions()

    def _signal_stale(self) -> None:
        """SIGHUP each listening worker whose snapshot names another version (at most once
        per ``RESIGNAL_S``). A worker not listening yet has no handler for it yet."""
        now = time.monotonic()
        for slot, snap in self._live():
            proc = slot.proc
            if (proc is None or proc.pid is None or snap is None or not snap["listening"]
                    or snap.get("config_version") == self.version
                    or now - self._signalled.get(proc.pid, -RESIGNAL_S) < RESIGNAL_S):
                continue
            self._signalled[proc.pid] = now
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGHUP)

    def health(self) -> tuple[bool, dict[str, Any]]:
        # As /readyz reads the snapshots: it said ready a round before /healthz stopped
        # saying that a replacement it counted as listening was failing.
        now = time.monotonic()
        for slot in self.slots:
            self._notice_listening(slot, now)
        failing = [{"worker": s.index, "failed_starts": s.failures, "error": s.error}
                   for s in self.slots if s.failures and not s.listening]
        return not failing and not self.gave_up, (
            {"workers_failing": failing} if failing else {})

    # --- keeping the workers running ---
    def _start(self, slot: _Slot) -> None:
        proc = self._ctx.Process(
            target=worker_main, name=f"shadowproxy-worker-{slot.index}", daemon=True,
            args=(self.settings, self.url, self.log_format, slot.index, os.getpid(),
                  self.directory))
        # A worker takes a second to import before it can handle a signal; until then a
        # SIGTERM (this supervisor's stop) or SIGINT (Ctrl-C reaches the process group)
        # would end it by the default action, with a traceback and a failed exit status
        # for a stop that lost nothing. The child inherits the mask across exec and
        # unblocks the signals once it handles them (``_worker``). The resource tracker is
        # started first: starting it unblocks these signals in this thread.
        resource_tracker.ensure_running()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        slot.proc = proc
        slot.listening = False

    def _retire(self, slot: _Slot, proc: BaseProcess) -> str:
        """Fold a worker that is gone into the retained total; return why it failed."""
        snap = self._snapshot(proc.pid)
        if snap is not None:
            self.retained = fold(self.retained, snap["metrics"])
        error = self.directory / f"worker-{proc.pid}.error"
        reason = error.read_text().strip() if error.exists() else ""
        for leftover in (error, self.directory / f"worker-{proc.pid}.pickle"):
            leftover.unlink(missing_ok=True)
        slot.proc, slot.listening = None, False
        return reason or f"exited with status {proc.exitcode}"

    def _notice_listening(self, slot: _Slot, now: float) -> None:
        """Mark ``slot`` listening once its current process's snapshot says so. Called by
        each round and by whatever reads ``slot.listening`` between rounds: a reload's wait
        skipped a worker that had listened since the last round (up to ``_POLL_S``), and
        answered with that worker still on the old version."""
        if slot.proc is None or slot.listening:
            return
        snap = self._snapshot(slot.proc.pid)
        if snap is not None and snap["listening"]:
            slot.listening, slot.listening_since = True, now

    def check(self) -> bool:
        """One round: retire and replace workers that are gone; False once it gave up."""
        now = time.monotonic()
        for slot in self.slots:
            proc = slot.proc
            if proc is not None and not proc.is_alive():
                listened = now - slot.listening_since if slot.listening else None
                reason = self._retire(slot, proc)
                if self.stopping:
                    continue
                if listened is not None and listened >= STABLE_S:
                    log.error("worker %d (pid %s) %s; replacing it", slot.index, proc.pid,
                              reason)
                    slot.failures, slot.next_start = 0, now
                else:
                    if listened is not None:
                        reason += f" {listened:.1f} s after it started listening"
                    slot.failures += 1
                    slot.error = reason
                    if slot.failures >= MAX_START_FAILURES:
                        log.error("worker %d could not start %d times in a row (%s); "
                                  "giving up", slot.index, slot.failures, reason)
                        self.gave_up = True
                        return False
                    delay = FIRST_RETRY_S * 2 ** (slot.failures - 1)
                    log.error("worker %d could not start (%s); retrying in %.1f s "
                              "(attempt %d of %d)", slot.index, reason, delay,
                              slot.failures + 1, MAX_START_FAILURES)
                    slot.next_start = now + delay
            if slot.proc is None and not self.stopping and now >= slot.next_start:
                self._start(slot)
            elif slot.proc is not None and not slot.listening:
                self._notice_listening(slot, now)
            elif slot.proc is not None and slot.failures and \
                    now - slot.listening_since >= STABLE_S:
                slot.failures, slot.error = 0, ""  # it has kept running: healthy again
        if not self.stopping:
            self._signal_stale()
        return True

    async def stop_all(self) -> int:
        """SIGTERM every worker and wait for it to drain; 0 if each exited 0."""
        self.stopping = True
        status = 0
        for slot in self.slots:
            if slot.proc is not None and slot.proc.is_alive() and slot.proc.pid is not None:
                os.kill(slot.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + stop_timeout_s(self.settings.limits.shutdown_grace_s)
        while True:
            waiting = [s.proc for s in self.slots if s.proc is not None and s.proc.is_alive()]
            if not waiting or time.monotonic() > deadline:
                break
            await asyncio.sleep(_POLL_S)
        for slot in self.slots:
            proc = slot.proc
            if proc is None:
                continue
            if proc.is_alive():
                log.error("worker %d (pid %s) did not stop in time; killing it", slot.index,
                          proc.pid)
                proc.kill()
                proc.join(5)
                status = 1
                self._retire(slot, proc)
            elif proc.exitcode != 0:
                # Said, so that the supervisor's failed exit status has a reason in the log.
                log.error("worker %d (pid %s) %s during the stop", slot.index, proc.pid,
                          self._retire(slot, proc))
                status = 1
            else:
                self._retire(slot, proc)
        return status


async def supervise(settings: Settings, url: str, log_format: str,
                    config_path: Path | None = None, config_digest: str | None = None) -> int:
    """Run ``settings.workers`` workers until SIGTERM/SIGINT, or until one cannot start.
    ``config_digest``: the digest of the bytes ``settings`` were loaded from
    (``app.running``)."""
    from shadowproxy.admin import build_admin_app, start_admin
    from shadowproxy.config import split_listen
    from shadowproxy.runner import on_sighup, stop_event

    supervisor = Supervisor(settings, url, log_format)
    supervisor.prepare()
    stop = stop_event()
    reloader = None
    if config_path is not None:
        reloader = supervisor.reloader = Reloader(config_path, settings, supervisor.apply,
                                                  supervisor.metrics, supervisor.directory,
                                                  digest=config_digest)

    async def reload() -> ReloadOutcome | None:
        if reloader is None or stop.is_set() or supervisor.stopping:
            return None
        return await reloader.reload("POST /-/reload")

    admin = None
    admin_address = None
    if settings.admin_listen is not None:
        # Bound before any worker starts: a taken admin port leaves nothing to stop.
        app = build_admin_app(supervisor.readiness, supervisor.snapshots,
                              settings.admin_token, health=supervisor.health,
                              reload=reload if reloader is not None else None)
        admin = await start_admin(app, settings.admin_listen)
        admin_address = f"{split_listen(settings.admin_listen)[0]}:{admin.addresses[0][1]}"
    status = 0
    try:
        if reloader is not None and config_path is not None:
            control.write_process_file(supervisor.directory, config_path, admin_address)
            on_sighup(reloader.reload)
            reloader.start()
        log.info("supervising %d workers on %s", settings.workers, settings.listen)
        while not stop.is_set():
            if not supervisor.check():
                status = 1
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _POLL_S)
    finally:
        # From the stop's first step: /readyz says 503 and a reload under way stops waiting
        # for the workers. The stop waits for that reload; meanwhile /readyz said ready.
        supervisor.stopping = True
        if reloader is not None:
            await reloader.close()
            control.remove_process_file(supervisor.directory)
        status = max(status, await supervisor.stop_all())
        if admin is not None:
            await admin.cleanup()
    return status
