"""Connection attempts that fail or are cut at their deadline, against real sockets on
127.0.0.1, on both event loops the proxy may run on."""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from collections.abc import Callable

import pytest
import uvloop

from shadowproxy.config import Limits, Shadow
from shadowproxy.failures import ErrorKind
from shadowproxy.metrics import Metrics
from shadowproxy.mirror import CompiledShadow, ShadowCall
from shadowproxy.models import CapturedResponse, Exchange
from shadowproxy.upstream import UpstreamPool
from tests.upstreams import unaccepting_listener

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


class Tally:
    """Where finished exchanges go: counted, not kept (a kept exchange that refers back
    to its recorder would be a cycle of the test's own)."""

    def __init__(self) -> None:
        self.submitted = 0

    def submit(self, exchange: Exchange) -> None:
        self.submitted += 1


def refused_port() -> int:
    """A port nothing listens on: every connection attempt is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def call_until_done(port: int, calls: int) -> list[CapturedResponse]:
    loop = asyncio.get_running_loop()
    pool = UpstreamPool(loop, f"http://127.0.0.1:{port}", "s", Limits())
    shadow = CompiledShadow("r", Shadow(name="s", url=f"http://127.0.0.1:{port}",
                                        timeout_s=0.05), pool, Metrics())
    tally = Tally()
    records = []
    for _ in range(calls):
        exchange = Exchange("r", time.time(), "GET", "/p", "", [], None, "rid")
        exchange.recorder = tally
        record = CapturedResponse("s", "shadow", time.time())
        call = ShadowCall(shadow, exchange, record, b"GET /p HTTP/1.1\r\n\r\n", b"", False,
                          True, 1000)
        shadow.counters.in_flight += 1
        pool.start(call)
        records.append(record)
    deadline = time.perf_counter() + 5.0
    while any(r.error_kind is None for r in records) and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.01)  # the attempts' tasks end after the calls fail
    pool.close()
    assert tally.submitted == calls
    return records


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize("upstream", ["dead", "refused"])
def test_failed_connection_attempts_leave_no_reference_cycles(loop: str, upstream: str
                                                              ) -> None:
    """Attempts cut at their deadline (a dead upstream) or refused leave nothing for the
    cyclic collector: against a dead shadow a proxy makes about a thousand a second, and the
    once-a-minute collection of what they left stopped the event loop for hundreds of
    milliseconds."""
    expected = ErrorKind.TIMEOUT if upstream == "dead" else ErrorKind.CONNECT
    with unaccepting_listener() as dead, asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        port = int(dead.rsplit(":", 1)[1]) if upstream == "dead" else refused_port()
        runner.run(call_until_done(port, 5))  # the loop's own first-use allocations
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            records = runner.run(call_until_done(port, 50))
            cycles = gc.collect()
            kinds = sorted({type(o).__name__ for o in gc.garbage})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert {r.error_kind for r in records} == {expected}
    assert cycles == 0, f"{cycles} objects in reference cycles: {kinds}"
