"""Python's cyclic garbage collector, kept off the data path.

The data path frees what it allocates by reference counting: requests and connections break
their reference cycles when they end, and under load nothing is left for the cyclic
collector to find (gc callbacks under ``bench/run.sh`` find the objects of start-up and
shutdown, none made per request; fast, slow and hung shadows alike). What the automatic
collector does is then pure cost, and it grows with what is alive: a generation-1 pass walks
every exchange waiting in the recorder's queue, so with a few thousand queued it stops the
event loop for tens of milliseconds, about twice a second at full load
(docs/performance.md has the figures). So once start-up is done the start-up objects are
frozen, the automatic collector is off, and a background task runs one full collection a
minute: a cycle that does appear (an odd error path) is freed within a minute, at the cost
of one short pause a minute instead of a long one twice a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator

from shadowproxy.tasks import spawn

log = logging.getLogger("shadowproxy")

COLLECT_INTERVAL_S = 60.0


async def _collect_periodically(interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        started = time.perf_counter()
        freed = gc.collect()
        log.debug("cyclic garbage collection: %d objects freed in %.1f ms", freed,
                  (time.perf_counter() - started) * 1000)


@contextlib.asynccontextmanager
async def collected_in_the_background(
        interval_s: float = COLLECT_INTERVAL_S) -> AsyncIterator[None]:
    """From start-up's end to shutdown: start-up objects frozen (no collection walks them
    again), automatic collection off, a full collection every ``interval_s``. Restores the
    collector on the way out."""
    gc.collect()
    gc.freeze()
    gc.disable()
    collector = spawn(_collect_periodically(interval_s), name="cycle-collector")
    try:
        yield
    finally:
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector
        gc.unfreeze()
        gc.enable()
