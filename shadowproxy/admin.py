"""The admin listener: /healthz, /readyz, /metrics and POST /-/reload, as a small aiohttp app.

Bound to ``admin_listen`` (127.0.0.1 by default). With ``admin_token`` set, probes stay
open, as Envoy's ``/ready`` and Traefik's ``/ping`` are, so that a Kubernetes or Compose
probe needs no secret: ``/healthz`` and ``/readyz`` answer their status code and
``{"status": ...}`` to anyone. What reveals data needs ``Authorization: Bearer <token>``:
``/metrics``, the details of ``/readyz`` (database state, spool, workers, config version)
and ``POST /-/reload``. A refused request gets 401 with ``WWW-Authenticate: Bearer``
(RFC 6750).

``POST /-/reload`` reloads the config file and answers the outcome as JSON
(``reload.ReloadOutcome``): 200 when applied (or unchanged), 422 with every problem when the
file is invalid (nothing changed), 503 while the proxy starts or stops.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from shadowproxy.config import split_listen
from shadowproxy.errors import ListenError
from shadowproxy.metrics import SnapshotCollector
from shadowproxy.reload import ReloadOutcome

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]
Reload = Callable[[], Awaitable[ReloadOutcome | None]]
"""Reloads the config file; None when it cannot now (starting or stopping)."""
Health = Callable[[], tuple[bool, dict[str, Any]]]
Snapshots = Callable[[], list[dict[str, Any]]]

PROBE_PATHS = ("/healthz", "/readyz")
"""Open to probes without the token (their details are not)."""

READINESS: web.AppKey[Readiness] = web.AppKey("readiness")
HEALTH: web.AppKey[Health] = web.AppKey("health")
RELOAD: web.AppKey[Reload] = web.AppKey("reload")
REGISTRY = web.AppKey("registry", CollectorRegistry)
TOKEN = web.AppKey("token", str)
_REALM = 'Bearer realm="shadowproxy admin"'


def _authorized(request: web.Request) -> bool:
    """True without a token configured, or with the right bearer token."""
    token = request.app.get(TOKEN)
    if not token:
        return True
    # RFC 9110 §11.1: the scheme is case-insensitive; RFC 6750 §2.1: one or more spaces
    # before the token. Only the token is secret, so only it is compared in constant time.
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    # aiohttp decodes header bytes that are not UTF-8 as surrogates: encoded back the same
    # way, such a header is a wrong token, not an exception (a 500 and a logged traceback).
    return hmac.compare_digest(given.lstrip(" ").encode("utf-8", "surrogateescape"),
                               token.encode())


@web.middleware
async def _require_token(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
    if request.path in PROBE_PATHS or _authorized(request):
        return await handler(request)
    given = "Authorization" in request.headers
    return web.json_response(
        {"error": "this admin endpoint needs 'Authorization: Bearer <admin_token>'"},
        status=401,
        # RFC 6750 §3: a wrong token is "invalid_token"; no token, no error code.
        headers={"WWW-Authenticate": _REALM + (', error="invalid_token"' if given else "")})


@web.middleware
async def _json_errors(request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
    """aiohttp's own refusals (no such endpoint, a wrong method) as JSON that says what the
    admin listener serves, like every other answer of it: a script reading the JSON of
    ``/-/reload`` (``| jq .result``) got the text ``405: Method Not Allowed``."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        allowed = " or ".join(sorted(m for m in exc.allowed_methods if m != "HEAD"))
        return web.json_response(
            {"error": f"{request.path} does not take {request.method}: use {allowed}"},
            status=exc.status, headers={"Allow": ",".join(sorted(exc.allowed_methods))})
    except web.HTTPNotFound as exc:
        served = ", ".join(f"{r.method} {r.resource.canonical}"
                           for r in request.app.router.routes()
                           if r.method != "HEAD" and r.resource is not None)
        return web.json_response(
            {"error": f"no admin endpoint at {request.path}; this listener serves {served}"},
            status=exc.status)


def _status(request: web.Request, ok: bool, word: str, detail: dict[str, Any]
            ) -> web.Response:
    body = {"status": word, **detail} if _authorized(request) else {"status": word}
    return web.json_response(body, status=200 if ok else 503)


async def _healthz(request: web.Request) -> web.Response:
    ok, detail = request.app[HEALTH]()
    return _status(request, ok, "ok" if ok else "failing", detail)


async def _readyz(request: web.Request) -> web.Response:
    ready, detail = await request.app[READINESS]()
    return _status(request, ready, "ready" if ready else "not ready", detail)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _reload(request: web.Request) -> web.Response:
    outcome = await request.app[RELOAD]()
    if outcome is None:
        return web.json_response({"error": "the proxy is starting or stopping; try again"},
                                 status=503)
    return web.json_response(outcome.as_dict(),
                             status=422 if outcome.result == "rejected" else 200)


def _always_healthy() -> tuple[bool, dict[str, Any]]:
    return True, {}


def build_admin_app(readiness: Readiness, snapshots: Snapshots, token: str | None,
                    health: Health = _always_healthy, reload: Reload | None = None
                    ) -> web.Application:
    """The admin application; ``health`` is for /healthz (a single process that answers
    is healthy; a supervisor whose workers cannot start is not); ``reload``, if given,
    serves ``POST /-/reload``."""
    app = web.Application(middlewares=[_json_errors, _require_token])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshots))
    app[READINESS] = readiness
    app[HEALTH] = health
    app[REGISTRY] = registry
    if token:
        app[TOKEN] = token
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    if reload is not None:
        app[RELOAD] = reload
        app.router.add_post("/-/reload", _reload)
    return app


async def start_admin(app: web.Application, listen: str) -> web.AppRunner:
    """Serve ``app`` on ``listen`` (HOST:PORT); the caller closes it with ``runner.cleanup()``."""
    host, port = split_listen(listen)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(f"cannot listen on {listen} (admin_listen): "
                          f"{exc.strerror or exc}; is another process using it? change "
                          "`admin_listen` in the config, or set it to null") from exc
    return runner
