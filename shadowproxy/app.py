"""One process's proxy: opens its resources in dependency order and closes them in reverse.

``running(settings)`` is the one place where the recorder, the upstream pools, the client
listener and the admin listener are opened and closed. Shutdown order: stop accepting →
let in-flight requests finish (grace period) → end shadow calls that outlive it → flush the
recorder to the database or the spool → close pools and the admin listener.
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
from shadowproxy.config import Settings
from shadowproxy.errors import ListenError
from shadowproxy.metrics import Metrics
from shadowproxy.mirror import CompiledShadow
from shadowproxy.proxy import ClientConnection, CompiledRoute, ProxyContext
from shadowproxy.recorder.recorder import Recorder
from shadowproxy.routing import Router
from shadowproxy.tasks import spawn
from shadowproxy.upstream import UpstreamPool

log = logging.getLogger("shadowproxy")


def listen_socket(listen: str, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket; with ``reuse_port`` (workers) several processes share it.

    Without it a second proxy on the same address fails loudly instead of silently
    sharing the port.
    """
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, int(port)))
        sock.listen(4096)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {listen}: {exc.strerror or exc}; is another "
                          "process using it? change `listen` in the config") from exc
    sock.setblocking(False)
    return sock


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

    async def drain(self, grace: float) -> None:
        """Stop accepting, answer what was accepted, end what outlives ``grace`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self.server.close()
        self.ctx.draining = True
        for conn in self.ctx.idle_connections():
            conn.close_if_idle()
        while loop.time() < deadline and (
                any(not c.is_idle() for c in self.ctx.connections)
                or any(p.active for p in self.pools)):
            await asyncio.sleep(0.02)
        for pool in self.pools:
            pool.abort_active()
        for conn in list(self.ctx.connections):
            if conn.transport is not None:
                conn.transport.abort()


def compile_routes(settings: Settings, loop: asyncio.AbstractEventLoop, metrics: Metrics
                   ) -> tuple[Router[CompiledRoute], list[UpstreamPool]]:
    """One pool per upstream URL, routes compiled for matching."""
    pools: dict[str, UpstreamPool] = {}

    def pool(url: str, name: str) -> UpstreamPool:
        if url not in pools:
            pools[url] = UpstreamPool(loop, url, name, settings.limits)
        return pools[url]

    entries = []
    for route in settings.routes:
        shadows = [CompiledShadow(route.name, s, pool(s.url, s.name), metrics)
                   for s in route.shadows]
        target = CompiledRoute(route, pool(route.primary.url, f"{route.name}-primary"),
                               shadows, metrics.route(route.name))
        entries.append((route.match.path_prefix, route.match.methods, target))
    return Router(entries), list(pools.values())


async def _sweep(ctx: ProxyContext) -> None:
    while True:
        await asyncio.sleep(1.0)
        ctx.sweep()


@contextlib.asynccontextmanager
async def running(settings: Settings, database_url: str, *,
                  reuse_port: bool = False,
                  snapshots: Callable[[], list[dict[str, Any]]] | None = None,
                  serve_admin: bool = True) -> AsyncIterator[Proxy]:
    """Run one proxy process until the block exits, then shut it down gracefully.

    Each resource is registered on the exit stack as soon as it is open, so a failure half-way
    through start-up (a port in use, say) closes what was already open, in reverse order.
    """
    loop = asyncio.get_running_loop()
    metrics = Metrics()
    async with contextlib.AsyncExitStack() as stack:
        # Listen first: a port in use fails before anything else is started.
        sock = listen_socket(settings.listen, reuse_port=reuse_port)
        stack.callback(sock.close)
        recorder = Recorder(settings.recording, database_url, settings.data_dir, metrics,
                            log_exchanges=settings.access_log,
                            replay_grace_s=settings.limits.shutdown_grace_s)
        await recorder.start()
        stack.push_async_callback(recorder.close)
        if not recorder.database_ok:
            log.warning("database not reachable at start-up; records go to the spool in %s "
                        "until it is", settings.data_dir / "spool")
        router, pools = compile_routes(settings, loop, metrics)
        for pool in pools:
            stack.callback(pool.close)
        ctx = ProxyContext(loop, router, recorder,
                           max_mirror_body=settings.limits.max_mirror_body_bytes,
                           capture_cap=settings.recording.max_body_bytes,
                           max_header_bytes=settings.limits.max_header_bytes,
                           client_timeout=settings.limits.client_timeout_s)
        server = await loop.create_server(lambda: ClientConnection(ctx), sock=sock)
        proxy = Proxy(settings, metrics, recorder, ctx, pools, server)
        # Runs first at exit: stop accepting and answer what was accepted, before the
        # recorder flushes and the pools close.
        stack.push_async_callback(proxy.drain, settings.limits.shutdown_grace_s)
        sweeper = spawn(_sweep(ctx), name="sweeper")
        stack.callback(sweeper.cancel)
        if serve_admin and settings.admin_listen is not None:
            app = build_admin_app(proxy.readiness,
                                  snapshots or (lambda: [metrics.snapshot()]),
                                  settings.admin_token)
            admin = await start_admin(app, settings.admin_listen)
            proxy.admin_port = admin.addresses[0][1]
            stack.push_async_callback(admin.cleanup)
        log.info("listening on %s, routes: %s (%s)", settings.listen,
                 ", ".join(r.name for r in settings.routes), build.describe())
        yield proxy
    served = sum(sum(c.codes.values()) for c in metrics.routes.values())
    records = metrics.records
    # One line a benchmark or an operator can check: every answered request is accounted for.
    log.info("stopped: served=%d written=%d spooled=%d dropped=%d", served,
             records["written"], records["spooled"], records["dropped"])
