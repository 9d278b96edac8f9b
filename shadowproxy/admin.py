"""The admin listener: /healthz, /readyz and /metrics, as a small aiohttp application.

Bound to ``admin_listen`` (127.0.0.1 by default); with ``admin_token`` set, every endpoint
but /healthz needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from shadowproxy.errors import ListenError
from shadowproxy.metrics import SnapshotCollector

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]
Snapshots = Callable[[], list[dict[str, Any]]]

READINESS: web.AppKey[Readiness] = web.AppKey("readiness")
REGISTRY = web.AppKey("registry", CollectorRegistry)
TOKEN = web.AppKey("token", str)


@web.middleware
async def _require_token(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
    token = request.app.get(TOKEN)
    if token and request.path != "/healthz":
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return web.json_response({"error": "admin endpoints need "
                                               "'Authorization: Bearer <admin_token>'"},
                                     status=401)
    return await handler(request)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ready, detail = await request.app[READINESS]()
    return web.json_response({"status": "ready" if ready else "not ready", **detail},
                             status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_admin_app(readiness: Readiness, snapshots: Snapshots,
                    token: str | None) -> web.Application:
    app = web.Application(middlewares=[_require_token])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshots))
    app[READINESS] = readiness
    app[REGISTRY] = registry
    if token:
        app[TOKEN] = token
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


async def start_admin(app: web.Application, listen: str) -> web.AppRunner:
    """Serve ``app`` on ``listen`` (HOST:PORT); the caller closes it with ``runner.cleanup()``."""
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]"), int(port))
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(f"cannot listen on {listen} (admin_listen): "
                          f"{exc.strerror or exc}; change `admin_listen`, or set it to null"
                          ) from exc
    return runner
