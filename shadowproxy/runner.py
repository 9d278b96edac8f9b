"""``shadowproxy run``: the event loop, signals, and worker processes.

With ``workers: 1`` the proxy runs in this process. With ``workers: N`` this process is a
supervisor: it starts N worker processes that each bind ``listen`` with SO_REUSEPORT (the
kernel spreads connections over them), serves the admin endpoints itself from the
workers' metric snapshots, restarts a worker that dies, and on SIGTERM/SIGINT passes the
signal on and waits for every worker to drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from shadowproxy.config import Settings
from shadowproxy.cycles import collected_in_the_background
from shadowproxy.errors import ShadowProxyError
from shadowproxy.logs import setup_logging
from shadowproxy.store.database import database_url
from shadowproxy.tasks import spawn

log = logging.getLogger("shadowproxy")

_SNAPSHOT_INTERVAL_S = 1.0


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run ``coro`` on uvloop when it is installed, else on asyncio's default loop."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def serve(settings: Settings, *, log_format: str = "text") -> int:
    """Run the proxy until SIGTERM/SIGINT; return the exit status.

    A failure to start (a taken port, the embedded database) is logged as one line in the
    log format and gives exit status 1.
    """
    from shadowproxy.app import ensure_free

    setup_logging(log_format)
    try:
        # Before the embedded database or any worker starts, which can take seconds.
        ensure_free(settings.listen, "listen")
        if settings.admin_listen is not None:
            ensure_free(settings.admin_listen, "admin_listen")
        url = database_url(settings)
        if settings.workers == 1:
            return _run(_single(settings, url))
        return _run(_supervise(settings, url, log_format))
    except ShadowProxyError as exc:
        log.error("%s", exc)
        return exc.exit_status


async def _single(settings: Settings, url: str) -> int:
    from shadowproxy.app import running

    stop = _stop_event()
    async with running(settings, url), collected_in_the_background():
        await stop.wait()
        log.info("signal received: draining (grace %.0fs)", settings.limits.shutdown_grace_s)
    return 0


# --- workers --------------------------------------------------------------------------------

def _snapshot_dir(settings: Settings) -> Path:
    return settings.data_dir / "run"


def _worker_main(settings: Settings, url: str, log_format: str, index: int) -> None:
    setup_logging(log_format)
    os.environ["SHADOWPROXY_WORKER"] = str(index)
    raise SystemExit(_run(_worker(settings, url, index)))


async def _worker(settings: Settings, url: str, index: int) -> int:
    from shadowproxy.app import running

    stop = _stop_event()
    directory = _snapshot_dir(settings)
    path = directory / f"worker-{index}.pickle"
    async with (running(settings, url, serve_admin=False, reuse_port=True) as proxy,
                collected_in_the_background()):

        async def publish() -> None:
            while True:
                ready, detail = await proxy.readiness()
                snap = {"metrics": proxy.metrics.snapshot(), "ready": ready, "detail": detail,
                        "pid": os.getpid(), "time": time.time()}
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(pickle.dumps(snap))
                tmp.replace(path)  # atomic, so the supervisor never reads half a file
                await asyncio.sleep(_SNAPSHOT_INTERVAL_S)

        publisher = spawn(publish(), name="metrics-publisher")
        await stop.wait()
        publisher.cancel()
    return 0


async def _supervise(settings: Settings, url: str, log_format: str) -> int:
    from shadowproxy.admin import build_admin_app, start_admin

    directory = _snapshot_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("worker-*.pickle"):
        old.unlink()
    ctx = multiprocessing.get_context("spawn")
    workers: dict[int, multiprocessing.process.BaseProcess] = {}

    def start(index: int) -> None:
        proc = ctx.Process(target=_worker_main, args=(settings, url, log_format, index),
                           name=f"shadowproxy-worker-{index}")
        proc.start()
        workers[index] = proc

    def snapshots() -> list[dict[str, Any]]:
        out = []
        for index in workers:
            try:
                out.append(pickle.loads((directory / f"worker-{index}.pickle").read_bytes()))
            except (FileNotFoundError, EOFError, pickle.UnpicklingError):
                continue
        return out

    async def readiness() -> tuple[bool, dict[str, Any]]:
        snaps = snapshots()
        fresh = [s for s in snaps if time.time() - s["time"] < 5 * _SNAPSHOT_INTERVAL_S]
        alive = sum(1 for p in workers.values() if p.is_alive())
        ready = alive == len(workers) and len(fresh) == len(workers) and all(
            s["ready"] for s in fresh)
        return ready, {"workers": alive, "workers_configured": len(workers),
                       "database": sorted({s["detail"]["database"] for s in fresh})}

    admin = None
    if settings.admin_listen is not None:
        # Bound before any worker starts: a taken admin port leaves nothing to stop.
        app = build_admin_app(readiness, lambda: [s["metrics"] for s in snapshots()],
                              settings.admin_token)
        admin = await start_admin(app, settings.admin_listen)
    for index in range(settings.workers):
        start(index)
    stop = _stop_event()
    log.info("supervising %d workers on %s", settings.workers, settings.listen)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        for index, proc in list(workers.items()):
            if not proc.is_alive() and not stop.is_set():
                log.error("worker %d (pid %s) exited with %s; restarting it",
                          index, proc.pid, proc.exitcode)
                start(index)
    for proc in workers.values():
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + settings.limits.shutdown_grace_s + 15
    status = 0
    for proc in workers.values():
        await asyncio.get_running_loop().run_in_executor(
            None, proc.join, max(0.1, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            status = 1
        elif proc.exitcode not in (0, None):
            status = 1
    if admin is not None:
        await admin.cleanup()
    return status
