"""Where PostgreSQL's CPU per recorded exchange goes, once the server is in its steady state.

Pushes exchanges (a 1 KB JSON request, a primary's and a shadow's JSON answers: those of
``recorder_bench.py``) through the real recorder into an embedded PostgreSQL in a temporary
folder: first ``--warmup`` of them (the server makes its WAL segments and starts
checkpointing), then ``--records`` measured. Nothing reads the tables while it runs (a read
sets hint bits, which on a cluster with data checksums writes every page read again, with
a full-page image in the WAL: not what recording costs). Prints, per exchange, the CPU of
each kind of server process (the writing backend, autovacuum, checkpointer, background
writer, WAL writer; user and system time from /proc), and the WAL's records, full-page
images and bytes (``pg_stat_wal``).

With ``--perf`` it also samples the writing backend with ``perf record --call-graph dwarf``
for a few seconds of the measured part and prints the shares of its time under the
functions that make up a COPY of records: the JSON bodies and headers read into ``jsonb``,
the index inserts, the heap inserts and the writes of the pages COPY's ring gives back, and
the rest. perf's share of kernel time is not reliable in a virtual machine (samples taken
with interrupts held land late); /proc's system time above is.

    python bench/server_cost.py --records 200000 [--perf]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import tempfile
import time
from pathlib import Path

import asyncpg
import psutil
from recorder_bench import copy_of, exchange  # bench/recorder_bench.py

from shadowproxy.config import RecordingConfig
from shadowproxy.metrics import Metrics
from shadowproxy.recorder.recorder import Recorder
from shadowproxy.store.embedded import embedded_server
from shadowproxy.store.migrate import migrate

# Functions of a COPY FROM whose inclusive share of the backend's samples is printed.
PARTS = {
    "jsonb_recv": "JSON text read into jsonb (bodies and headers)",
    "ExecInsertIndexTuples": "index inserts",
    "heap_multi_insert": "heap inserts (with the writes below)",
    "GetVictimBuffer": "writing out the pages COPY's ring buffer gives back",
    "table_slot_create": "a tuple slot per buffered row",
    "XLogInsert": "WAL records",
    "CommitTransaction": "commit (WAL flush)",
    "NextCopyFrom": "reading and converting each row (all types)",
    "entry_SYSCALL_64_after_hwframe": "system calls (perf's share; see /proc above)",
}


async def push(url: str, records: int, before_close: object = None) -> float:
    """Submit ``records`` exchanges as fast as the writer drains them; seconds taken."""
    metrics = Metrics()
    config = RecordingConfig(batch_max_records=1000, queue_max_records=50_000,
                             flush_interval_ms=200)
    with tempfile.TemporaryDirectory() as tmp:
        recorder = Recorder(config, url, Path(tmp), metrics)
        await recorder.start()
        template = [exchange(i) for i in range(1000)]
        started = time.perf_counter()
        for i in range(records):
            recorder.submit(copy_of(template[i % 1000]))
            if i % 500 == 0:
                while len(recorder.queue) > 12_500:  # below the spool's mark
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0)
        await recorder.drained()
        while metrics.records["written"] < records - metrics.records["dropped"]:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        if callable(before_close):
            before_close()  # the writing backend ends with the recorder's connection
        await recorder.close()
    return elapsed


def server_cpu(postmaster: int) -> dict[tuple[int, str], tuple[float, float]]:
    """(pid, kind) -> (user, system) seconds of each server process."""
    cpu = {}
    for child in psutil.Process(postmaster).children():
        try:
            title = " ".join(child.cmdline())
            kind = title.split(":", 1)[-1].strip().split(" ")[0]
            kind = "backend" if kind == "postgres" else kind
            times = child.cpu_times()
            cpu[(child.pid, kind)] = (times.user, times.system)
        except psutil.Error:
            continue
    return cpu


def profile(pid: int, seconds: float, out: Path) -> dict[str, float]:
    """Inclusive shares (%) of PARTS in ``pid``'s samples over ``seconds``."""
    subprocess.run(["perf", "record", "-q", "-p", str(pid), "--call-graph", "dwarf,16384",
                    "-F", "300", "-o", str(out), "--", "sleep", str(seconds)],
                   check=True, capture_output=True)
    report = subprocess.run(["perf", "report", "-i", str(out), "--children", "--sort", "sym",
                             "-q", "-g", "none", "--percentage", "relative"],
                            check=True, capture_output=True, text=True).stdout
    shares = {}
    for line in report.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[-1] in PARTS and fields[-1] not in shares:
            shares[fields[-1]] = float(fields[0].rstrip("%"))
    return shares


async def measure(url: str, warmup: int, records: int, perf: bool) -> dict[str, object]:
    await migrate(url)
    conn = await asyncpg.connect(url)
    try:
        postmaster = psutil.Process(await conn.fetchval("SELECT pg_backend_pid()")).ppid()
        await push(url, warmup)
        wal = "SELECT wal_records, wal_fpi, wal_bytes FROM pg_stat_wal"
        wal0 = dict(await conn.fetchrow(wal))
        cpu0 = server_cpu(postmaster)
        at_close: dict[tuple[int, str], tuple[float, float]] = {}
        shares: dict[str, float] = {}
        profiling = None
        if perf:
            async def sample() -> None:
                await asyncio.sleep(2)  # the recorder's connection is writing by then
                own = await conn.fetchval("SELECT pg_backend_pid()")
                writers = [pid for (pid, kind) in server_cpu(postmaster)
                           if kind == "backend" and pid != own]
                with tempfile.TemporaryDirectory() as tmp:
                    shares.update(await asyncio.to_thread(
                        profile, max(writers), 4, Path(tmp) / "perf.data"))
            profiling = asyncio.ensure_future(sample())
        elapsed = await push(url, records, lambda: at_close.update(server_cpu(postmaster)))
        if profiling is not None:
            await profiling
        await asyncio.sleep(2)  # what the background processes do after the last batch
        cpu1 = {**at_close, **server_cpu(postmaster)}
        wal1 = dict(await conn.fetchrow(wal))
    finally:
        await conn.close()
    by_kind: dict[str, list[float]] = {}
    for key, (user, system) in cpu1.items():
        user0, system0 = cpu0.get(key, (0.0, 0.0))
        part = by_kind.setdefault(key[1], [0.0, 0.0])
        part[0] += user - user0
        part[1] += system - system0
    per = 1e6 / records
    return {
        "exchanges_per_s": round(records / elapsed),
        "server_cpu_us_per_exchange": round(sum(u + s for u, s in by_kind.values()) * per, 2),
        "by_process_us_per_exchange": {
            kind: {"user": round(u * per, 2), "system": round(s * per, 2)}
            for kind, (u, s) in sorted(by_kind.items(), key=lambda kv: -sum(kv[1]))
            if u + s > 0},
        "wal_per_exchange": {key: round(float(wal1[key] - wal0[key]) / records, 3)
                             for key in wal1},
        **({"backend_profile_percent": {f"{name} ({PARTS[name]})": share
                                        for name, share in shares.items()}} if perf else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--warmup", type=int, default=300_000)
    parser.add_argument("--perf", action="store_true", help="profile the writing backend")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sp-server-cost-") as folder:
        Path(folder).chmod(0o755)  # as root, the embedded server runs as its own user
        with embedded_server(Path(folder)) as url:
            result = asyncio.run(measure(url, args.warmup, args.records, args.perf))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
