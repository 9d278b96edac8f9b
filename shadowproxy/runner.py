"""``shadowproxy run``: the event loop, signals, and which process model runs.

SIGTERM and SIGINT stop the proxy gracefully; SIGHUP reloads its configuration file.

With ``workers: 1`` the proxy runs in this process. With ``workers: N`` this process is a
supervisor of N worker processes that share ``listen`` (``shadowproxy/workers.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from shadowproxy import control
from shadowproxy.config import Settings
from shadowproxy.cycles import collected_in_the_background
from shadowproxy.errors import Interrupted, ShadowProxyError
from shadowproxy.logs import setup_logging
from shadowproxy.store.database import database_url

log = logging.getLogger("shadowproxy")

T = TypeVar("T")


def run_loop(coro: Coroutine[Any, Any, int]) -> int:
    """Run ``coro`` on uvloop when it is installed, else on asyncio's default loop."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def run_command(coro: Coroutine[Any, Any, T], *, interrupted: str,
                fast: bool = False) -> T:
    """Run a command's coroutine (migrate, report, labels import, prune, replay) on a loop
    of its own, uvloop's when ``fast``; Ctrl-C raises Interrupted (exit status 130) with
    ``interrupted``: what the interruption left, and what to do.

    The first Ctrl-C cancels the coroutine, as asyncio.run does: its connection is dropped
    at once (``database.connection``) and PostgreSQL rolls back what was open, so that the
    end is quick whatever the database does. A Ctrl-C pressed again while it ends is
    ignored: asyncio.run raised KeyboardInterrupt wherever the code was at that moment (a
    driver's task, a finaliser), and the command ended with their tracebacks
    (``Task exception was never retrieved``, ``Exception ignored in``). The loop does
    not report the driver's wait that the dropped connection leaves uncollected
    (``quiet_cut_waiters``): it printed ``Future exception was never retrieved`` with a
    traceback as the command exited. A command that handles Ctrl-C itself (a replay's
    stop) adds its own handler over this one while it runs."""
    from shadowproxy.store.database import quiet_cut_waiters

    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if fast:
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
            pass
    stopped_by: list[int] = []

    async def interruptible() -> T:
        loop = asyncio.get_running_loop()
        quiet_cut_waiters(loop)
        task = asyncio.current_task()
        assert task is not None

        def on_sigint() -> None:
            if not stopped_by:
                stopped_by.append(signal.SIGINT)
                task.cancel()

        if threading.current_thread() is not threading.main_thread():
            return await coro  # signals reach the main thread only (tests run commands so)
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        try:
            return await coro
        finally:
            if stopped_by:
                ignore_ctrl_c_from_now(loop)

    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(interruptible())
    except KeyboardInterrupt:
        pass  # a Ctrl-C before the handler above was in place (asyncio.Runner's own)
    except (asyncio.CancelledError, ShadowProxyError):
        # What the dropped connection broke on the way out (a ROLLBACK, an unlock) is not
        # the news: the interruption is.
        if not stopped_by:
            raise
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # nothing is left to interrupt
    raise Interrupted(f"interrupted: {interrupted}")


def ignore_ctrl_c_from_now(loop: asyncio.AbstractEventLoop) -> None:
    """Ignore SIGINT from now to the process's exit, in place of the loop's handler: a
    command ending after a Ctrl-C, whose end is bounded. Not given its default back when
    the loop closes: a Ctrl-C pressed again then raised KeyboardInterrupt wherever the code
    was (a finaliser of the connection's objects, the recorder storing a replay's last
    answers), with a traceback, and lost what was being stored."""
    # Blocked while the loop's handler gives way: between the two, SIGINT's default.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        loop.remove_signal_handler(signal.SIGINT)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def stop_event() -> asyncio.Event:
    """Set by SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def on_sighup(reload: Callable[[str], Coroutine[Any, Any, object]]) -> None:
    """Reload on SIGHUP (``docker compose kill -s HUP``, ``shadowproxy reload``)."""
    from shadowproxy.tasks import spawn

    asyncio.get_running_loop().add_signal_handler(
        signal.SIGHUP, lambda: spawn(reload("SIGHUP"), name="config-reload"))


def serve(settings: Settings, *, log_format: str = "text",
          config_path: Path | None = None, config_digest: str | None = None) -> int:
    """Run the proxy until SIGTERM/SIGINT; return the exit status.

    ``config_digest``: the digest of the bytes ``settings`` were loaded from
    (``configwatch.digest_of``), which ``watch: true`` compares the file with.

    A failure to start (a data_dir another proxy holds, a taken port, the embedded
    database) is logged as one line in the log format and gives exit status 1.
    """
    from shadowproxy.app import ensure_free

    setup_logging(log_format)
    # Ignored until the proxy runs and reloads on it: a SIGHUP while the embedded database
    # starts must not end the process (its default action).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    claimed: int | None = None
    try:
        # Before the embedded database or any worker starts, which can take seconds.
        claimed = control.claim(settings.data_dir / "run")
        ensure_free(settings.listen, "listen")
        if settings.admin_listen is not None:
            ensure_free(settings.admin_listen, "admin_listen")
        url = database_url(settings)
        if settings.workers == 1:
            return stopped(run_loop(_single(settings, url, config_path, config_digest)))
        from shadowproxy.workers import supervise

        return stopped(run_loop(supervise(settings, url, log_format, config_path,
                                               config_digest)))
    except ShadowProxyError as exc:
        log.error("%s", exc)
        return exc.exit_status
    finally:
        if claimed is not None:
            os.close(claimed)


def stopped(status: int) -> int:
    """The stop is over, its last line logged and the loop closed, which gave SIGTERM and
    SIGINT their default action back: ignore them for the moments left before the process
    exits (the embedded database's stop may be among them). The same signal sent again (a
    second Ctrl-C, a supervisor repeating its SIGTERM) killed the process there, and a
    clean stop ended with it killed by that signal (exit status 130 or 143, not 0)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    return status


async def _single(settings: Settings, url: str, config_path: Path | None,
                  config_digest: str | None) -> int:
    from shadowproxy.app import running

    stop = stop_event()
    async with running(settings, url, config_path=config_path,
                       config_digest=config_digest) as proxy, \
            collected_in_the_background():
        if config_path is not None:
            on_sighup(proxy.reload)
        await stop.wait()
        log.info("signal received: draining (grace %gs)",
                 proxy.settings.limits.shutdown_grace_s)
    return 0
