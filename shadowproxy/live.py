"""One process's running configuration: routes compiled against pools that outlive reloads.

``compile_routes`` turns settings into the router the data path matches against. The
upstream pools come from a ``PoolRegistry`` kept for the process's whole life, keyed by the
upstream's URL: a reload that keeps an upstream keeps its pool and with it the pool's
keep-alive connections, so a reload causes no reconnect storm. A pool the new configuration
no longer names is retired (``UpstreamPool.retire``): its idle connections close at once,
each busy one when its call ends, and calls of requests that arrived under the earlier
configuration are still made on it. A later configuration naming the URL again revives it.

A retired pool stays in the registry for the process's life, since something may still
start a call on it: a request whose head arrived under an earlier configuration holds that
configuration's route, and with it the pool, until its body is in (a slow upload, a
request pipelined behind a slow one), across any number of reloads. The registry lists it
whenever it has calls in flight, so that a stop waits for them (and ends those that
outlive the grace), and its close refuses new ones; forgetting it at the next reload once
it had no call left let such a late call run unseen by the stop, and its exchange never
reach the recorder. Held strongly, not weakly (the compiled ``UpstreamPool`` cannot be
weakly referenced): a retired pool without calls holds no connection, and there is one
pool per URL ever configured.

What a pool does with its connections follows the running configuration's ``limits``
(``upstream_idle_s``, ``max_response_header_bytes``): a reload hands a kept pool the new
values (``UpstreamPool.use_limits``), as it hands a new pool its first ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from shadowproxy.config import Limits, Settings
from shadowproxy.metrics import Metrics
from shadowproxy.mirror import CompiledShadow
from shadowproxy.proxy import CompiledRoute
from shadowproxy.recorder.rows import RowEncoder
from shadowproxy.routing import Router
from shadowproxy.upstream import UpstreamPool


class PoolRegistry:
    """The upstream pools of one process, by URL, across reloads."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pools: dict[str, UpstreamPool] = {}
        """The pools the running configuration uses."""
        self._retired: dict[str, UpstreamPool] = {}
        """Retired pools: a route of an earlier configuration may still hold one."""

    def pool(self, url: str, name: str, limits: Limits) -> UpstreamPool:
        """The pool of ``url`` (made on first use; revived if it was retired), working to
        ``limits``."""
        pool = self._pools.get(url)
        if pool is None:
            pool = self._retired.pop(url, None)
            if pool is None:
                pool = self._pools[url] = UpstreamPool(self.loop, url, name, limits)
                return pool
            self._pools[url] = pool
        pool.use_limits(limits)
        if pool.retired:
            pool.revive()
        return pool

    def keep_only(self, used: Iterable[UpstreamPool]) -> list[UpstreamPool]:
        """Retire every pool not in ``used`` (kept among the retired). Returns the pools
        retired now."""
        keep = {id(p) for p in used}
        retired = []
        for url, pool in list(self._pools.items()):
            if id(pool) in keep:
                continue
            del self._pools[url]
            pool.retire()
            self._retired[url] = pool
            retired.append(pool)
        return retired

    def all(self) -> list[UpstreamPool]:
        """Every pool that carries a call or may: in use, or retired with calls left."""
        return [*self._pools.values(), *(p for p in self._retired.values() if p.active)]

    def close(self) -> None:
        """Close every pool, retired ones too: a call a request of an earlier configuration
        would start from now on fails as ``shutdown``."""
        for pool in [*self._pools.values(), *self._retired.values()]:
            pool.close()


def compile_routes(settings: Settings, version: str, registry: PoolRegistry,
                   metrics: Metrics, rules: RowEncoder | None = None
                   ) -> tuple[Router[CompiledRoute], list[UpstreamPool]]:
    """The router for ``settings`` (stamped with ``version``, and holding its recording
    ``rules`` for its exchanges: ``Recorder.use_rules``) and the pools it uses.

    Counters are looked up by route and shadow name, so they carry on across reloads; a
    shadow with ``enabled: false`` is left out of its route (not mirrored to).
    """
    used: dict[int, UpstreamPool] = {}

    def pool(url: str, name: str) -> UpstreamPool:
        found = registry.pool(url, name, settings.limits)
        used[id(found)] = found
        return found

    entries = []
    for route in settings.routes:
        shadows = [CompiledShadow(route.name, s, pool(s.url, s.name), metrics)
                   for s in route.shadows if s.enabled]
        compiled = CompiledRoute(route, pool(route.primary.url, f"{route.name}-primary"),
                                 shadows, metrics.route(route.name), version=version,
                                 capture_cap=settings.recording.max_body_bytes,
                                 max_mirror_body=settings.limits.max_mirror_body_bytes,
                                 rules=rules)
        entries.append((route.match.path_prefix, route.match.methods, compiled))
    return Router(entries), list(used.values())
