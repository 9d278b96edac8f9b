"""The hypervisor's steal time during each run of a bench/run.sh benchmark.

On a VM, "steal" is the time a vCPU was ready to run and the host ran something else:
/proc/stat counts it per CPU. A run during which the host took a share of the VM's cores
serves less for reasons outside every proxy, and a ratio to another proxy measured in other
minutes moves with it. ``record`` samples the machine's counters once a second (bench/run.sh
runs it beside the harness); ``by_run`` gives each run's steal share, the run's span taken
from the harness's log (each run's line is written when it ended, the line before it marks
its start).

    python bench/steal.py record OUT.tsv      # until killed
"""

from __future__ import annotations

import bisect
import re
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

Key = tuple[str, str, int]
"""(scenario, target, connections)"""

_LINE = re.compile(r"^\[(\d\d):(\d\d):(\d\d)\] (.*)$")
_RUN = re.compile(r"^(\S+)\s+(\S+)\s+c(\d+)\s+rep\d+: +\d")


def counters() -> tuple[int, int]:
    """(steal ticks, all ticks) of the whole machine, from /proc/stat's first line."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice, counted in user]
    return fields[7], sum(fields[:8])


def record(path: Path, interval: float = 1.0) -> None:
    with path.open("a", buffering=1) as out:
        while True:
            steal, total = counters()
            out.write(f"{time.time():.3f}\t{steal}\t{total}\n")
            time.sleep(interval)


def _samples(path: Path) -> list[tuple[float, int, int]]:
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            rows.append((float(parts[0]), int(parts[1]), int(parts[2])))
    return rows


def share(samples: list[tuple[float, int, int]], start: float, end: float) -> float | None:
    """Steal as a share of all CPU time between ``start`` and ``end`` (epoch seconds), from
    the last sample at or before the start to the first at or after the end."""
    times = [s[0] for s in samples]
    i = bisect.bisect_right(times, start) - 1
    j = bisect.bisect_left(times, end)
    if i < 0 or j >= len(samples) or j <= i:
        return None
    ticks = samples[j][2] - samples[i][2]
    return (samples[j][1] - samples[i][1]) / ticks if ticks else None


def spans(harness_log: Path, first_sample: float) -> list[tuple[Key, float, float]]:
    """Each run's (key, start, end) in epoch seconds, in the order of the log. The log has
    wall-clock times of day (local time): dated from ``first_sample`` (a sample taken
    before the first run), a day added when the clock goes past midnight."""
    day = datetime.fromtimestamp(first_sample).replace(hour=0, minute=0, second=0,
                                                       microsecond=0)
    out: list[tuple[Key, float, float]] = []
    previous: float | None = None
    for line in harness_log.read_text().splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        at = (day + timedelta(hours=int(m[1]), minutes=int(m[2]), seconds=int(m[3])))
        stamp = at.timestamp()
        if previous is not None and stamp < previous - 3600:
            day += timedelta(days=1)
            stamp += 86400
        run = _RUN.match(m[4])
        if run and previous is not None:
            out.append(((run[1], run[2], int(run[3])), previous, stamp))
        previous = stamp
    return out


def by_run(harness_log: Path, samples_path: Path) -> dict[Key, list[float]]:
    """Each run's steal share, by (scenario, target, connections), in the order of the reps."""
    samples = _samples(samples_path)
    if not samples:
        return {}
    out: dict[Key, list[float]] = {}
    for key, start, end in spans(harness_log, samples[0][0]):
        value = share(samples, start, end)
        if value is not None:
            out.setdefault(key, []).append(value)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "record":
        sys.exit("usage: python bench/steal.py record OUT.tsv")
    record(Path(sys.argv[2]))
