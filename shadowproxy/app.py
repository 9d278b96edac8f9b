"""One process's proxy: opens its resources in dependency order and closes them in reverse.

``running(settings)`` is the one place where the recorder, the upstream pools, the client
listener and the admin listener are opened and closed.

Start: bind the client socket, then the admin listener (so that a taken port of either
fails before anything else starts; /readyz says "starting" meanwhile) → the upstream
pools → the recorder (database or spool) → accept clients.

Stop, the reverse (``STOP_STEPS``): stop accepting → finish the in-flight requests →
shadow calls up to ``limits.shutdown_grace_s``, then end what outlives it → flush the
recorder to the database or the spool → close the upstream pools → close the admin
listener last, so that probes and /metrics answer until the end (/readyz says 503 from
the first step on).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

from shadowproxy import build
from shadowproxy.admin import build_admin_app, start_admin
from shadowproxy.config import Settings, split_listen
from shadowproxy.errors import ListenError
from shadowproxy.metrics import Metrics
from shadowproxy.mirror import ShadowTarget
from shadowproxy.proxy import ClientConnection, ProxyContext, RouteTarget
from shadowproxy.recorder.recorder import Recorder
from shadowproxy.routing import Router
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
                 ctx: ProxyContext, pools: list[UpstreamPool], server: asyncio.Server) -> None:
        self.settings = settings
        self.metrics = metrics
        self.recorder = recorder
        self.ctx = ctx
        self.pools = pools
        self.server = server
        self.admin_port: int | None = None
        self.stopped: list[str] = []
        """The steps of ``STOP_STEPS`` done so far, in the order they ran."""
        self.port = int(server.sockets[0].getsockname()[1])
        """The port clients connect to (useful with ``listen: 127.0.0.1:0``)."""

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        recorder = self.recorder
        spool_room = recorder.spool.max_bytes - recorder.spool.total_bytes()
        if recorder.database_ok and recorder.overflowing:
            database = "ok, behind the traffic: the excess is spooled and stored as it catches up"
        elif recorder.database_ok:
            database = "ok"
        elif recorder.spool_full or spool_room <= 0:
            database = "unreachable, spool full: records are dropped"
        else:
            database = "unreachable, spooling"
        ready = recorder.database_ok or (spool_room > 0 and not recorder.spool_full)
        return ready, {"database": database, "spool_bytes_free": spool_room,
                       "routes": len(self.settings.routes)}

    def stop_accepting(self) -> None:
        """Close the listener; idle keep-alive connections close, busy ones after their
        answer."""
        self.server.close()
        self.ctx.draining = True
        for conn in self.ctx.idle_connections():
            conn.close_if_idle()

    async def finish_requests(self, deadline: float) -> None:
        """Wait (until ``deadline``, loop time) for every accepted request to be answered."""
        loop = asyncio.get_running_loop()
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


def compile_routes(settings: Settings, loop: asyncio.AbstractEventLoop, metrics: Metrics
                   ) -> tuple[Router[RouteTarget], list[UpstreamPool]]:
    """One pool per upstream URL, routes compiled for matching."""
    pools: dict[str, UpstreamPool] = {}

    def pool(url: str, name: str) -> UpstreamPool:
        if url not in pools:
            pools[url] = UpstreamPool(loop, url, name)
        return pools[url]

    entries = []
    for route in settings.routes:
        shadows = [ShadowTarget(route.name, s, pool(s.url, s.name), metrics)
                   for s in route.shadows]
        target = RouteTarget(route.name, pool(route.primary.url, f"{route.name}-primary"),
                             route.primary.timeout_s, shadows, route.preserve_host,
                             metrics.route(route.name))
        entries.append((route.match.path_prefix, route.match.methods, target))
    return Router(entries), list(pools.values())


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
                  serve_admin: bool = True) -> AsyncIterator[Proxy]:
    """Run one proxy process until the block exits, then shut it down gracefully.

    Each resource is registered on the exit stack as soon as it is open, so the stack
    unwinds in the reverse of the start order (the module docstring gives both), and a
    failure half-way through start-up (a port in use, say) closes what was already open.
    """
    loop = asyncio.get_running_loop()
    metrics = Metrics()
    stopping = _Stopping()
    proxy: Proxy | None = None

    async def readiness() -> tuple[bool, dict[str, Any]]:
        if proxy is None:
            return False, {"state": "starting"}
        if stopping.started:
            return False, {"state": "stopping"}
        return await proxy.readiness()

    async with contextlib.AsyncExitStack() as stack:
        # Both ports first: a port in use fails before anything else is started.
        sock = listen_socket(settings.listen, reuse_port=reuse_port)
        stack.callback(sock.close)
        admin_port: int | None = None
        if serve_admin and settings.admin_listen is not None:
            app = build_admin_app(readiness, snapshots or (lambda: [metrics.snapshot()]),
                                  settings.admin_token)
            admin = await start_admin(app, settings.admin_listen)
            admin_port = admin.addresses[0][1]

            async def close_admin() -> None:
                stopping.step("close admin")
                await admin.cleanup()

            stack.push_async_callback(close_admin)
        router, pools = compile_routes(settings, loop, metrics)

        def close_pools() -> None:
            stopping.step("close pools")
            for pool in pools:
                pool.close()

        stack.callback(close_pools)
        recorder = Recorder(settings.recording, database_url, settings.data_dir, metrics,
                            log_exchanges=settings.access_log,
                            replay_grace_s=settings.limits.shutdown_grace_s)
        await recorder.start()

        async def flush_records() -> None:
            stopping.step("flush records")
            await recorder.close()

        stack.push_async_callback(flush_records)
        if not recorder.database_ok:
            log.warning("database not reachable at start-up; records go to the spool in %s "
                        "until it is", settings.data_dir / "spool")
        ctx = ProxyContext(loop, router, recorder,
                           max_mirror_body=settings.limits.max_mirror_body_bytes,
                           capture_cap=settings.recording.max_body_bytes,
                           max_header_bytes=settings.limits.max_header_bytes,
                           client_timeout=settings.limits.client_timeout_s)
        server = await loop.create_server(lambda: ClientConnection(ctx), sock=sock)
        started = Proxy(settings, metrics, recorder, ctx, pools, server)
        started.admin_port = admin_port
        started.stopped = stopping.done

        async def drain() -> None:
            deadline = loop.time() + settings.limits.shutdown_grace_s
            stopping.step("stop accepting")
            started.stop_accepting()
            stopping.step("finish requests")
            await started.finish_requests(deadline)
            stopping.step("finish shadow calls")
            await started.finish_upstream_calls(deadline)

        stack.push_async_callback(drain)
        sweeper = spawn(_sweep(ctx), name="sweeper")
        stack.callback(sweeper.cancel)
        proxy = started
        log.info("listening on %s, routes: %s (%s)", settings.listen,
                 ", ".join(r.name for r in settings.routes), build.describe())
        yield proxy
    served = sum(sum(c.codes.values()) for c in metrics.routes.values())
    records = metrics.records
    # One line a benchmark or an operator can check: every answered request is accounted for.
    log.info("stopped: served=%d written=%d spooled=%d dropped=%d", served,
             records["written"], records["spooled"], records["dropped"])
