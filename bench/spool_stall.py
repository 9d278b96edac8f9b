"""How long the recorder's spool holds the event loop: while it spools and while it replays.

The data path shares the event loop with the recorder: each moment the loop spends in one
piece of the recorder's work is added to the latency of every request waiting for it. This
spools --records exchanges (a 1 KB JSON request, a primary's and a shadow's answer, as
bench/recorder_bench.py) for a database that cannot be reached, then replays them into a
real PostgreSQL, while a probe task asks the loop for a 1 ms sleep over and over and notes
how late each wake-up is. It reports the probe's longest and 99th-percentile lateness in
each phase, and how many wake-ups were over 2 ms late. The loop is uvloop and the cyclic
garbage collector runs as in the proxy (cycles.py). The database is the one at
--database-url, or an embedded PostgreSQL.

    PYTHONPATH=COMPILED_TREE .venv/bin/python bench/spool_stall.py --records 20000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from pathlib import Path

import uvloop
from recorder_bench import copy_of, exchange  # bench/recorder_bench.py

from shadowproxy import build
from shadowproxy.config import RecordingConfig
from shadowproxy.cycles import collected_in_the_background
from shadowproxy.metrics import Metrics
from shadowproxy.recorder.recorder import Recorder
from shadowproxy.store.embedded import embedded_server
from shadowproxy.store.migrate import migrate

UNREACHABLE = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"


class Probe:
    """Sleeps 1 ms at a time and keeps how late each wake-up was, in ms."""

    def __init__(self) -> None:
        self.late: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.late = []
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            self.late.append((time.perf_counter() - before) * 1000 - 1.0)

    async def stop(self) -> dict[str, float]:
        assert self._task is not None
        self._task.cancel()
        late = sorted(self.late)
        return {"wakeups": len(late), "max_late_ms": round(late[-1], 2),
                "p99_late_ms": round(late[int(len(late) * 0.99)], 2),
                "over_2ms": sum(1 for x in late if x > 2.0)}


async def run(url: str, records: int) -> dict[str, object]:
    await migrate(url)
    async with collected_in_the_background():  # the collector's regime of a running proxy
        return await measure(url, records)


async def measure(url: str, records: int) -> dict[str, object]:
    config = RecordingConfig(batch_max_records=1000, queue_max_records=50_000)
    template = [exchange(i) for i in range(1000)]
    probe = Probe()
    result: dict[str, object] = {"build": build.describe(), "records": records}
    with tempfile.TemporaryDirectory() as tmp:
        down = Recorder(config, UNREACHABLE, Path(tmp), Metrics())
        await down.start()
        probe.start()
        for i in range(records):
            down.submit(copy_of(template[i % 1000]))
            if i % 50 == 49:
                await asyncio.sleep(0)  # as traffic arrives: a few at a time
        await down.drained()
        result["spooling"] = await probe.stop()
        await down.close()

        metrics = Metrics()
        up = Recorder(config, url, Path(tmp), metrics)
        probe.start()
        started = time.perf_counter()
        await up.start()
        while metrics.records["written"] < records:
            await asyncio.sleep(0.01)
        result["replaying"] = await probe.stop()
        result["replay_s"] = round(time.perf_counter() - started, 2)
        await up.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.database_url
        if url is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            tmp.chmod(0o755)  # as root, the server runs as its own user
            url = stack.enter_context(embedded_server(tmp))
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # as the proxy
            print(json.dumps(runner.run(run(url, args.records)), indent=2))


if __name__ == "__main__":
    main()
