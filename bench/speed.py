"""How fast each core of the machine was during each run of a bench/run.sh benchmark.

Steal time (bench/steal.py) counts the moments the host ran something else on a vCPU. A core
can also do less per second of its own time: the host's other guests share its caches and
memory bandwidth, its clock can change, a mitigation can make system calls dearer. Every
proxy's CPU per request then grows with it, and a ratio between proxies measured in
different minutes moves. ``record`` measures, once a second on each CPU, the CPU time the
thread spends on two fixed pieces of work: the interpreter's (a loop of dictionary, string
and integer operations) and the kernel's (64 bytes written to and read back from a loopback
socket pair, 25 times), the least of four rounds each. CPU time, not elapsed time: waiting
for a core the proxy keeps busy does not count, while a slower core, or time the host took
in the middle of the probe (which the guest cannot see), does. ``by_run`` gives each run's
median on each CPU. The probes take about a millisecond per CPU per second.

    python bench/speed.py record OUT.tsv      # until killed
    python bench/speed.py rest                # the probe back to back and after sleeping
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time
from pathlib import Path

import steal  # bench/steal.py: the runs' spans in the harness's log
from steal import Key


def interpreter_probe() -> int:
    """Thread CPU nanoseconds of a fixed piece of interpreter work."""
    started = time.thread_time_ns()
    table: dict[int, str] = {}
    total = 0
    for i in range(500):
        table[i & 63] = "k" + str(i)
        total += len(table[(i * 7) & 63]) if (i * 7) & 63 in table else i
    return time.thread_time_ns() - started


def kernel_probe(pair: tuple[socket.socket, socket.socket]) -> int:
    """Thread CPU nanoseconds of 25 writes and reads of 64 bytes on a socket pair."""
    a, b = pair
    data = b"x" * 64
    started = time.thread_time_ns()
    for _ in range(25):
        a.send(data)
        b.recv(64)
    return time.thread_time_ns() - started


def record(path: Path, interval: float = 1.0) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    pair = socket.socketpair()
    with path.open("a", buffering=1) as out:
        while True:
            for cpu in cpus:
                os.sched_setaffinity(0, {cpu})  # moves this thread there at once
                # The least of a few rounds, the first of which warms the caches: what is
                # measured is the core's speed, not how cold a probe once a second finds it.
                python_ns = min(interpreter_probe() for _ in range(4))
                kernel_ns = min(kernel_probe(pair) for _ in range(4))
                out.write(f"{time.time():.3f}\t{cpu}\t{python_ns}\t{kernel_ns}\n")
            time.sleep(interval)


def _samples(path: Path, cpu: int) -> list[tuple[float, int, int, int]]:
    """(time, cpu, interpreter ns, kernel ns) of each sample taken on ``cpu``."""
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 4 and int(parts[1]) == cpu:
            rows.append((float(parts[0]), cpu, int(parts[2]), int(parts[3])))
    return rows


def _medians(samples: list[tuple[float, int, int, int]]) -> tuple[float, float]:
    """The median (interpreter µs, kernel µs) of ``samples``."""
    return (statistics.median(s[2] for s in samples) / 1000,
            statistics.median(s[3] for s in samples) / 1000)


def by_run(harness_log: Path, samples_path: Path, cpu: int
           ) -> dict[Key, list[tuple[float, float]]]:
    """Each run's median (interpreter µs, kernel µs) on ``cpu``, by (scenario, target,
    connections), in the order of the reps."""
    samples = _samples(samples_path, cpu)
    if not samples:
        return {}
    out: dict[Key, list[tuple[float, float]]] = {}
    for key, start, end in steal.spans(harness_log, samples[0][0]):
        during = [s for s in samples if start <= s[0] <= end]
        if during:
            out.setdefault(key, []).append(_medians(during))
    return out


def overall(samples_path: Path, cpu: int) -> tuple[float, float] | None:
    """The median (interpreter µs, kernel µs) on ``cpu`` over the whole recording."""
    samples = _samples(samples_path, cpu)
    return _medians(samples) if samples else None


def after_rest(cpu: int = 1, rounds: int = 40, rest_s: float = 0.2) -> dict[str, list[float]]:
    """The interpreter probe on ``cpu`` run back to back, and after ``rest_s`` of sleep
    (the least of four rounds, as ``record`` takes it): how much slower the core is for a
    process that comes back from waiting, as a proxy in front of a slow model does."""
    os.sched_setaffinity(0, {cpu})
    for _ in range(20):
        interpreter_probe()  # warm up
    busy = [interpreter_probe() / 1000 for _ in range(rounds * 4)]
    rested = []
    for _ in range(rounds):
        time.sleep(rest_s)
        rested.append(min(interpreter_probe() for _ in range(4)) / 1000)
    return {"back to back": busy, f"after {rest_s * 1000:.0f} ms asleep": rested}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "record":
        record(Path(sys.argv[2]))
    elif len(sys.argv) == 2 and sys.argv[1] == "rest":
        for name, values in after_rest().items():
            q = statistics.quantiles(values, n=10)
            print(f"interpreter probe, {name}: min {min(values):.0f} µs, p10 {q[0]:.0f}, "
                  f"median {statistics.median(values):.0f}, p90 {q[-1]:.0f}")
    else:
        sys.exit("usage: python bench/speed.py record OUT.tsv | rest")


if __name__ == "__main__":
    main()
