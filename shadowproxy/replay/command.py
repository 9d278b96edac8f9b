"""``shadowproxy replay``: check, say what will happen, replay, say what happened.

Exit status: 0 when every handled request's answer is in the database; 2 for bad usage
(an unknown route, a --where PostgreSQL rejects, bad options); 1 for a runtime failure (the
database, another replay of the same route and name running, answers left out of the
database); 130 when interrupted (what was handled is stored; the next run resumes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from urllib.parse import urlsplit

from shadowproxy.compare.window import Window
from shadowproxy.config import Route, Settings
from shadowproxy.errors import DatabaseError, ShadowProxyError, UsageError
from shadowproxy.replay.options import ReplayOptions, from_args
from shadowproxy.replay.pacing import pacer_for
from shadowproxy.replay.progress import TICK_S, preflight_lines, progress_bar, summary_lines
from shadowproxy.replay.replayer import Replayer, Tally
from shadowproxy.replay.source import RequestStream, Selection, lock_target
from shadowproxy.runner import run_command
from shadowproxy.store.database import connect, connection, describe
from shadowproxy.store.migrate import apply as apply_migrations
from shadowproxy.tasks import spawn

INTERRUPTED_STATUS = 130


def run_replay(args: argparse.Namespace) -> int:
    """The CLI command."""
    from shadowproxy.config import load_config
    from shadowproxy.store.database import database_url

    options = from_args(args)
    settings = load_config(args.config)
    route = _route(settings, options)
    url = database_url(settings)
    return run_command(_replay(settings, route, options, url), fast=True, interrupted=(
        "the answers stored so far stay; the same command again sends only the requests "
        "without one"))


def _route(settings: Settings, options: ReplayOptions) -> Route:
    try:
        route = settings.route(options.route)
    except KeyError as exc:
        raise UsageError(f"--route: {exc.args[0]}") from exc
    for shadow in route.shadows:
        if shadow.name == options.name and shadow.sample_rate > 0:
            print(f"note: {options.name!r} is also a live shadow of route {route.name!r}: "
                  "requests it answered live count as answered", file=sys.stderr)
    return route


async def _replay(settings: Settings, route: Route, options: ReplayOptions, url: str) -> int:
    conn = await connect(url)
    replayer: Replayer | None = None
    try:
        await apply_migrations(conn)  # role 'replay' needs migration 004
        if not await lock_target(conn, route.name, options.name):
            raise ShadowProxyError(
                f"another `shadowproxy replay` of route {route.name!r} as {options.name!r} is "
                f"running on {describe(url)}; wait for it to end, or stop it (Ctrl-C) first")
        # The selection is fixed now (Selection.fix): a window that ends later ends here, so
        # that the window shown, and the --to of a resume, are the ones selected.
        asked_end = options.window.end
        now = datetime.now(UTC)
        if asked_end > now:
            options = replace(options, window=Window(options.window.start,
                                                     max(now, options.window.start)))
        selection = Selection(options)
        await selection.check(conn)
        await selection.fix(conn)
        pre = await selection.preflight(conn)
        pacer = pacer_for(options.rate, options.speed)
        print("\n".join(preflight_lines(options, pre, pacer, asked_end=asked_end)), flush=True)
        if pre.pending == 0:
            print("nothing to replay")
            return 0
        await _reachable(options.url, options.timeout_s)
        replayer = Replayer(options, settings.recording, settings.data_dir, url,
                            RequestStream(conn, selection), pacer, limits=settings.limits)
        started = datetime.fromtimestamp(time.time(), UTC)
        clock = time.monotonic()
        with progress_bar(pre.pending, options.name) as update:
            ticker: list[asyncio.Task[None]] = []

            def start_ticking(tally: Tally) -> None:
                ticker.append(spawn(_tick(update, tally), name="replay-progress"))

            try:
                tally = await replayer.run(start_ticking)
            finally:
                for task in ticker:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            update(tally, final=True)
        elapsed = time.monotonic() - clock
        # A fresh connection: an interrupted read may have left the first one mid-query.
        stored: int | None = None
        try:
            # Interrupted, the operator wants out: a database that does not answer at once
            # (the usual reason for a Ctrl-C here) gets a few seconds, not the usual ten.
            async with connection(url, timeout=3.0 if replayer.stopping else 10.0) \
                    as counting:
                stored = await selection.stored_since(counting, started)
        except DatabaseError as exc:
            # A database gone silent (the usual reason for a Ctrl-C here): the summary
            # still says what was sent and where the answers are.
            print(f"shadowproxy: {exc}", file=sys.stderr)
        recorder = replayer.recorder
        spooled = recorder is not None and recorder.spool.has_pending()
        print("\n".join(summary_lines(options, tally, stored, elapsed,
                                      interrupted=replayer.stopping, spooled=spooled)))
        if replayer.stopping:
            return INTERRUPTED_STATUS
        return 1 if stored is None or stored < tally.recorded else 0
    finally:
        if replayer is not None and replayer.stopping:
            # Interrupted, often because the database stopped answering: a polite close
            # would wait for it; the server rolls the read-only transaction back anyway.
            conn.terminate()
        else:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5.0)


async def _reachable(url: str, timeout_s: float) -> None:
    """Fail before sending anything when the target cannot be connected to at all (not
    started, wrong port): otherwise every request would be stored as a connect failure."""
    import ssl

    parts = urlsplit(url)
    tls = ssl.create_default_context() if parts.scheme == "https" else None
    port = parts.port or (443 if tls else 80)
    wait_s = min(timeout_s, 10.0)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, port, ssl=tls), wait_s)
    except ssl.SSLCertVerificationError as exc:
        raise ShadowProxyError(
            f"--to {url}: the target's TLS certificate is not trusted "
            f"({exc.verify_message}); nothing was sent: add the certificate of the CA that "
            "signed it to this machine's trust store, or name a PEM file holding it in "
            "SSL_CERT_FILE") from exc
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        # The wait's TimeoutError says nothing of itself (a host that drops the packets, a
        # firewall): name what happened. (An exception is always true: test its text.)
        why = (f"no answer within {wait_s:g}s" if isinstance(exc, TimeoutError)
               and not str(exc) else str(exc) or type(exc).__name__)
        raise ShadowProxyError(f"--to {url}: cannot connect ({why}); "
                               "nothing was sent: start the target or fix the URL") from exc
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()


async def _tick(update: Callable[[Tally], None], tally: Tally) -> None:
    while True:
        update(tally)
        await asyncio.sleep(TICK_S)
