"""One process's proxy: opens its resources in dependency order and closes them in reverse.

``running(settings)`` opens and closes one proxy process's recorder, upstream pools, client
listener and admin listener (a ``workers: N`` supervisor serves its own admin listener:
``workers.py``).

Start: bind the client socket, then the admin listener (so that a taken port of either
fails before anything else starts; /readyz says "starting" meanwhile) → the upstream
pools → the recorder (database or spool) → the storage maintenance task (partitions ahead,
retention: ``store/maintenance.py``) → accept clients.

Reload (``reload.Reloader``, from SIGHUP, ``POST /-/reload``, ``shadowproxy reload`` or
``watch: true``): ``Proxy.apply`` compiles the new routes against the same upstream pools
(``live.py``) and swaps the router in one synchronous step; nothing else is restarted.

Stop, the reverse: the reloader stops (and its process file goes) and the sweeper is
cancelled, then ``STOP_STEPS``: stop accepting → finish the in-flight requests → wait for
the upstream calls still running (shadows, mostly), all within ``limits.shutdown_grace_s``
of the first step, then end the calls and client connections that outlive it → end the
storage maintenance task → flush the recorder to the database, within the grace again, or
the spool → close the upstream pools → close the admin listener last, so that probes and
/metrics answer until the end (/readyz says 503 from the first step on).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from shadowproxy import build, control
from shadowproxy.admin import build_admin_app, start_admin
from shadowproxy.config import Settings, split_listen
from shadowproxy.errors import ListenError
from shadowproxy.live import PoolRegistry, compile_routes
from shadowproxy.metrics import Metrics
from shadowproxy.proxy import ClientConnection, ProxyContext
from shadowproxy.recorder.recorder import Recorder
from shadowproxy.recorder.rows import RowEncoder
from shadowproxy.reload import Reloader, ReloadOutcome, config_version
from shadowproxy.stopwatch import watch_stop
from shadowproxy.store.maintenance import Maintenance
from shadowproxy.tasks import spawn
from shadowproxy.upstream import UpstreamPool

log = logging.getLogger("shadowproxy")


def listen_socket(listen: str, *, reuse_port: bool = False, key: str = "listen"
                  ) -> socket.socket:
    """A listening TCP socket; with ``reuse_port`` (workers) several processes share it.

    Without it a second proxy on the same address fails loudly instead of silently
    sharing the port.
    """
    sock = _bound(listen, key, reuse_port=reuse_port)
    try:
        sock.listen(4096)
    except OSError as exc:
        sock.close()
        raise _listen_error(listen, key, exc) from exc
    sock.setblocking(False)
    return sock


def ensure_free(listen: str, key: str) -> None:
    """Raise ListenError if ``listen`` cannot be bound now (another process listens there).

    Checked before anything slow starts (the embedded database, worker processes), so that
    a taken port ends the command at once. Binding without listening admits no client.
    """
    if split_listen(listen)[1] != 0:
        _bound(listen, key, reuse_port=False).close()


def _bound(listen: str, key: str, *, reuse_port: bool) -> socket.socket:
    host, port = split_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise _listen_error(listen, key, exc) from exc
    return sock


def _listen_error(listen: str, key: str, exc: OSError) -> ListenError:
    return ListenError(f"cannot listen on {listen} ({key}): {exc.strerror or exc}; is "
                       f"another process using it? change `{key}` in the config")


class Proxy:
    """Handles to a running proxy process's parts (for the runner, the admin and tests)."""

    def __init__(self, settings: Settings, metrics: Metrics, recorder: Recorder,
                 ctx: ProxyContext, registry: PoolRegistry, server: asyncio.Server) -> None:
        self.settings = settings
        """The running configuration (restart-only settings as at start)."""
        self.version = config_version(settings)
        self.metrics = metrics
        self.recorder = recorder
        self.ctx = ctx
        self.registry = registry
        self.server = server
        self.reloader: Reloader | None = None
        self.maintenance: Maintenance | None = None
        """The storage maintenance task (partitions ahead, retention)."""
        """With a config file (``running(config_path=...)``): reloads it."""
        self.admin_port: int | None = None
        self.stopped: list[str] = []
        """The steps of ``STOP_STEPS`` done so far, in the order they ran."""
        self.port = int(server.sockets[0].getsockname()[1])
        """The port clients connect to (useful with ``listen: 127.0.0.1:0``)."""

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready while records have somewhere to go: the database, or the spool during an
        outage. Not ready while the database refuses the proxy for good (a wrong password
        or database name, a server demanding TLS): that needs the operator, and an instance
        that can only spool should not take traffic for hours unnoticed."""
        recorder = self.recorder
        spool_room = recorder.spool.max_bytes - recorder.spool.total_bytes()
        problem = None if recorder.database_ok else recorder.problem
        permanent = problem is not None and problem.permanent
        if recorder.database_ok and recorder.overflowing:
            database = "ok, behind the traffic: the excess is spooled and stored as it catches up"
        elif recorder.database_ok:
            database = "ok"
        elif permanent:
            database = ("refused by the database (a permanent error, see database_error): "
                        "spooling until it is fixed")
        elif recorder.spool_failing:
            # Its cap was not the cause: "spool full" sent the operator to spool_max_bytes.
            database = ("unreachable, the spool cannot be written (a full disk, a read-only "
                        "file system: see the log): records are dropped")
        elif recorder.spool_full or spool_room <= 0:
            database = "unreachable, spool full: records are dropped"
        else:
            database = "unreachable, spooling"
        ready = not permanent and (
            recorder.database_ok or (spool_room > 0 and not recorder.spool_full))
        detail: dict[str, Any] = {"database": database, "spool_bytes_free": spool_room,
                                  "routes": len(self.settings.routes),
                                  "config_version": self.version}
        if problem is not None:
            detail["database_error"] = {"class": problem.kind, "cause": problem.cause,
                                        **({"fix": problem.fix} if problem.fix else {})}
        if self.reloader is not None:
            detail.update(self.reloader.describe())
        return ready, detail

    @property
    def pools(self) -> list[UpstreamPool]:
        """Every upstream pool that may carry a call (retired ones with calls left too)."""
        return self.registry.all()

    def apply(self, settings: Settings, version: str) -> None:
        """Make ``settings`` (validated, restart-only settings as running) the running
        configuration: requests whose head is parsed from now on take its routes; those
        before finish under theirs. One synchronous step, so no request sees half of it."""
        recorder = self.recorder
        rules = recorder.use_rules(settings.recording)
        router, used = compile_routes(settings, version, self.registry, self.metrics, rules)
        recorder.log_exchanges = settings.access_log
        # The stop's second grace, the database's, is the running one too: kept at its
        # value from the start, a lowered grace let a stop outlast twice the new one (and a
        # supervisor's kill timeout, which follows the reload).
        recorder.stop_grace_s = settings.limits.shutdown_grace_s
        ctx = self.ctx
        ctx.router = router
        ctx.max_header_bytes = settings.limits.max_header_bytes
        ctx.client_timeout = settings.limits.client_timeout_s
        self.registry.keep_only(used)
        ctx.pools = self.registry.all()  # swept for idle connections past upstream_idle_s
        if self.maintenance is not None and settings.storage != self.settings.storage:
            self.maintenance.settings_changed()
        self.settings = settings
        self.version = self.metrics.config_version = version

    async def reload(self, trigger: str) -> ReloadOutcome:
        """Reload the config file (``running`` was given one)."""
        assert self.reloader is not None, "running() was started without a config path"
        return await self.reloader.reload(trigger)

    def stop_accepting(self) -> None:
        """Close the listener; from now on connections close after their answer."""
        self.server.close()
        self.ctx.draining = True

    async def finish_requests(self, deadline: float) -> None:
        """Close the idle connections and wait (until ``deadline``, loop time) for every
        accepted request to be answered."""
        loop = asyncio.get_running_loop()
        # Once the loop has read what the kernel already holds: a request a client sent
        # before the stop began is then being served, not reset as an idle connection's.
        reads_done: asyncio.Future[None] = loop.create_future()

        def read() -> None:
            if not reads_done.done():  # (the stop's task may have been cancelled meanwhile)
                reads_done.set_result(None)

        self.ctx.after_reads(read)
        await reads_done
        for conn in self.ctx.idle_connections():
            conn.close_if_idle()
        while loop.time() < deadline and any(not c.is_idle() for c in self.ctx.connections):
            await asyncio.sleep(0.02)

    async def finish_upstream_calls(self, deadline: float) -> None:
        """Wait (until ``deadline``) for shadow calls, then end the calls and connections
        that outlive it (each recorded as ``shutdown``)."""
        loop = asyncio.get_running_loop()
        while loop.time() < deadline and any(p.active for p in self.pools):
            await asyncio.sleep(0.02)
        for pool in self.pools:
            pool.abort_active()
        for conn in list(self.ctx.connections):
            if conn.transport is not None:
                conn.transport.abort()

    async def drain(self, grace: float) -> None:
        """Stop accepting, answer what was accepted, end what outlives ``grace`` seconds."""
        deadline = asyncio.get_running_loop().time() + grace
        self.stop_accepting()
        await self.finish_requests(deadline)
        await self.finish_upstream_calls(deadline)


async def _sweep(ctx: ProxyContext) -> None:
    while True:
        await asyncio.sleep(1.0)
        ctx.sweep()


STOP_STEPS = ("stop accepting", "finish requests", "finish shadow calls", "flush records",
              "close pools", "close admin")
"""The order in which ``running`` stops a proxy; ``Proxy.stopped`` lists the steps done."""


class _Stopping:
    """The stop sequence: each step logged, done or not, in ``STOP_STEPS`` order."""

    def __init__(self) -> None:
        self.done: list[str] = []
        self.started = False

    def step(self, name: str) -> None:
        assert name in STOP_STEPS
        self.started = True
        self.done.append(name)
        log.debug("stopping: %s", name)


@contextlib.asynccontextmanager
async def running(settings: Settings, database_url: str, *,
                  reuse_port: bool = False,
                  snapshots: Callable[[], list[dict[str, Any]]] | None = None,
                  serve_admin: bool = True,
                  config_path: Path | None = None,
                  config_digest: str | None = None) -> AsyncIterator[Proxy]:
    """Run one proxy process until the block exits, then shut it down gracefully.

    Each resource is registered on the exit stack as soon as it is open, so the stack
    unwinds in the reverse of the start order (the module docstring gives both), and a
    failure half-way through start-up (a port in use, say) closes what was already open.

    With ``config_path`` (the file ``settings`` came from) the proxy can reload it:
    ``Proxy.reload``, ``POST /-/reload``, ``watch: true``, and ``shadowproxy reload``
    (which finds this process through ``data_dir/run``). ``config_digest``: the digest of the
    bytes ``settings`` were loaded from (``configwatch.digest_of``), which ``watch``
    compares the file with; without it, the file's content when the proxy starts to
    serve.
    """
    loop = asyncio.get_running_loop()
    metrics = Metrics()
    metrics.config_version = config_version(settings)
    stopping = _Stopping()
    proxy: Proxy | None = None

    async def readiness() -> tuple[bool, dict[str, Any]]:
        if proxy is None:
            return False, {"state": "starting"}
        if stopping.started:
            return False, {"state": "stopping"}
        return await proxy.readiness()

    async def reload() -> ReloadOutcome | None:
        if proxy is None or stopping.started:
            return None
        return await proxy.reload("POST /-/reload")

    async with contextlib.AsyncExitStack() as stack:
        # Both ports first: a port in use fails before anything else is started.
        sock = listen_socket(settings.listen, reuse_port=reuse_port)
        stack.callback(sock.close)
        admin_port: int | None = None
        if serve_admin and settings.admin_listen is not None:
            app = build_admin_app(readiness, snapshots or (lambda: [metrics.snapshot()]),
                                  settings.admin_token,
                                  reload=reload if config_path is not None else None)
            admin = await start_admin(app, settings.admin_listen)
            admin_port = admin.addresses[0][1]

            async def close_admin() -> None:
                stopping.step("close admin")
                await admin.cleanup()

            stack.push_async_callback(close_admin)
        registry = PoolRegistry(loop)
        rules = RowEncoder(settings.recording)
        router, _ = compile_routes(settings, metrics.config_version, registry, metrics, rules)

        def close_pools() -> None:
            stopping.step("close pools")
            registry.close()

        stack.callback(close_pools)
        recorder = Recorder(settings.recording, database_url, settings.data_dir, metrics,
                            log_exchanges=settings.access_log,
                            stop_grace_s=settings.limits.shutdown_grace_s,
                            rules=rules)
        await recorder.start()  # logs why, if the database cannot be used

        async def flush_records() -> None:
            stopping.step("flush records")
            await recorder.close()

        stack.push_async_callback(flush_records)
        ctx = ProxyContext(loop, router, recorder,
                           max_header_bytes=settings.limits.max_header_bytes,
                           client_timeout=settings.limits.client_timeout_s)
        server = await loop.create_server(lambda: ClientConnection(ctx), sock=sock)
        started = Proxy(settings, metrics, recorder, ctx, registry, server)
        started.admin_port = admin_port
        started.stopped = stopping.done
        # Partitions ahead and retention, in the background on its own connection; closed
        # after the drain, before the recorder flushes. It reads the running settings at
        # each run, so a reload applies.
        maintenance = started.maintenance = Maintenance(
            database_url, lambda: started.settings.storage, metrics)
        maintenance.start()
        stack.push_async_callback(maintenance.close)

        async def drain() -> None:
            # The running configuration's grace: a reload may have changed it.
            deadline = loop.time() + started.settings.limits.shutdown_grace_s
            stopping.step("stop accepting")
            started.stop_accepting()
            stopping.step("finish requests")
            await started.finish_requests(deadline)
            stopping.step("finish shadow calls")
            await started.finish_upstream_calls(deadline)

        stack.push_async_callback(drain)
        sweeper = spawn(_sweep(ctx), name="sweeper")
        stack.callback(sweeper.cancel)
        if config_path is not None:
            run_dir = settings.data_dir / "run"

            async def apply(new: Settings, version: str) -> None:
                started.apply(new, version)

            reloader = started.reloader = Reloader(config_path, settings, apply, metrics,
                                                   run_dir, digest=config_digest)
            admin_address = (None if admin_port is None or settings.admin_listen is None
                             else f"{split_listen(settings.admin_listen)[0]}:{admin_port}")
            control.write_process_file(run_dir, config_path, admin_address)
            stack.callback(control.remove_process_file, run_dir)
            stack.push_async_callback(reloader.close)  # first thing at a stop
            reloader.start()
        proxy = started
        log.info("listening on %s, routes: %s (%s)", settings.listen,
                 ", ".join(r.name for r in settings.routes), build.describe())
        yield proxy
        # The stop's own work (the last calls, the queue's flush and what the spool takes
        # within the grace) comes after any window a benchmark measures: the stop line says
        # what it cost, so that it can be charged to the requests that left it.
        stop_began = time.process_time()
        overdue = watch_stop(settings.limits.shutdown_grace_s)
    overdue.cancel()
    served = sum(sum(c.codes.values()) for c in metrics.routes.values())
    records = metrics.records
    # One line a benchmark or an operator can check: every answered request is accounted for.
    log.info("stopped: served=%d written=%d spooled=%d dropped=%d stop_cpu_s=%.3f", served,
             records["written"], records["spooled"], records["dropped"],
             time.process_time() - stop_began)
