"""A shadow whose host drops connection attempts, under full load: do descriptors stay flat
and does the client notice?

The dead shadow is a listening socket on 127.0.0.1 whose accept queue is full and that
never accepts, so the kernel drops every SYN (as a dead host or a dropping firewall would)
and each connection attempt lasts until the proxy gives up on it. Runs in pairs, one after
the other, with wrk at full load (POST, 1 KB JSON body): the shadow answering at once
("fast"), then the dead shadow ("dead"), ``--reps`` times. The proxy's open descriptors are
sampled every second from /proc. It prints req/s, p50 and p99 of each run, the medians'
ratios, and the descriptors seen (they should stay flat: attempts that time out are
cancelled and their sockets closed, and attempts in flight count against the shadow's
max_in_flight).

    python bench/dead_shadow.py --seconds 60 --reps 3 # the measurement
    python bench/dead_shadow.py --seconds 5           # a quick check that it runs
    python bench/dead_shadow.py --tree /tmp/compiled  # a tree from tools/compiled-tree.sh

The proxy runs pinned to CPU 0 and wrk and the upstreams to CPU 1 (``--no-pin`` to leave
them free); the records go to an embedded PostgreSQL in a scratch folder, pinned beside the
load, unless ``--database-url`` names one. Everything listens on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

from localhost import (  # bench/localhost.py
    free_port,
    pinned_database,
    post_script,
    start_fast_upstream,
    stop,
    stop_database,
    wait_for_port,
)


def dead_listener() -> tuple[socket.socket, list[socket.socket], int]:
    """A port whose accept queue is full and that never accepts."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    return server, fillers, port


def pinned(cpu: str | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if cpu is not None else argv


def millis(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(port: int, seconds: int, connections: int, script: Path, cpu: str | None
        ) -> dict[str, float]:
    out = subprocess.run(
        pinned(cpu, ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency",
                     "-s", str(script), f"http://127.0.0.1:{port}/predict"]),
        capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = millis(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = millis(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p50": p50, "p99": p99,
            "non2xx": float(errors.group(1)) if errors else 0.0,
            "socket_errors": 1.0 if socket_errors else 0.0}


def run(name: str, args: argparse.Namespace, work: Path, primary: int, shadow: int,
        script: Path) -> dict[str, float]:
    port = free_port()
    database = f'{{url: "{args.database_url}"}}'
    config = work / f"{name}.yaml"
    config.write_text(f"""listen: "127.0.0.1:{port}"
admin_listen: null
data_dir: "{work / 'data'}"
database: {database}
routes:
  - name: bench
    primary: {{url: "http://127.0.0.1:{primary}", timeout_s: 30}}
    shadows:
      - {{name: shadow, url: "http://127.0.0.1:{shadow}", timeout_s: {args.shadow_timeout},
         max_in_flight: {args.max_in_flight}}}
""")
    env = dict(os.environ)
    if args.tree:
        env["PYTHONPATH"] = args.tree
    with open(work / f"{name}.log", "wb") as log:
        proxy = subprocess.Popen(
            pinned(args.proxy_cpu,
                   [sys.executable, "-m", "shadowproxy", "run", "-c", str(config)]),
            cwd=work, env=env, stderr=log)
    try:
        wait_for_port(port, 60, proxy)
        wrk(port, 2, args.connections, script, args.load_cpu)  # warm-up
        fds: list[int] = []
        sampler_stop = time.monotonic() + args.seconds

        async def sample() -> None:
            while time.monotonic() < sampler_stop:
                with suppress(OSError):
                    fds.append(len(os.listdir(f"/proc/{proxy.pid}/fd")))
                await asyncio.sleep(1.0)

        async def measure() -> dict[str, float]:
            sampler = asyncio.create_task(sample())
            result = await asyncio.to_thread(wrk, port, args.seconds, args.connections,
                                             script, args.load_cpu)
            await sampler
            return result

        result = asyncio.run(measure())
        result.update(fd_first=fds[0], fd_min=min(fds), fd_max=max(fds), fd_last=fds[-1])
        return result
    finally:
        stop(proxy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--shadow-timeout", type=float, default=1.0)
    parser.add_argument("--max-in-flight", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=1, help="pairs of runs (medians shown)")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--tree", default=None, help="run the proxy from this source tree")
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    pin = not args.no_pin and shutil.which("taskset") is not None and os.cpu_count() != 1
    args.proxy_cpu, args.load_cpu = ("0", "1") if pin else (None, None)

    work = Path(tempfile.mkdtemp(prefix="shadowproxy-dead-shadow-"))
    work.chmod(0o755)  # the embedded PostgreSQL may run as its own user
    script = post_script(work)
    upstreams = []
    listener, fillers, dead = dead_listener()
    try:
        ports = []
        for _ in range(2):
            proc, port = start_fast_upstream(args.load_cpu)
            upstreams.append(proc)
            ports.append(port)
        if args.database_url is None:
            args.database_url = pinned_database(work / "pg", args.load_cpu)
        runs: list[tuple[str, dict[str, float]]] = []
        for _ in range(args.reps):  # interleaved, so that a noisy minute hits both
            runs.append(("fast", run("fast", args, work, ports[0], ports[1], script)))
            runs.append(("dead", run("dead", args, work, ports[0], dead, script)))
    finally:
        for proc in upstreams:
            proc.terminate()
            proc.wait()
        for sock in (*fillers, listener):
            sock.close()
        stop_database(work / "pg")
        shutil.rmtree(work, ignore_errors=True)

    print(f"{args.seconds} s per run, {args.connections} connections, shadow timeout_s "
          f"{args.shadow_timeout}, max_in_flight {args.max_in_flight}")
    print("| shadow | req/s | p50 ms | p99 ms | non-2xx | descriptors first / min / max / last |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in runs:
        print(f"| {name} | {r['rps']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} | "
              f"{r['non2xx']:.0f} | {r['fd_first']:.0f} / {r['fd_min']:.0f} / "
              f"{r['fd_max']:.0f} / {r['fd_last']:.0f} |")
    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for n, r in runs if n == name)

    print(f"dead / fast, medians of {args.reps}: "
          + ", ".join(f"{label} {median('dead', key) / median('fast', key):.2f}x"
                      for key, label in (("p50", "p50"), ("p99", "p99"), ("rps", "req/s"))))


if __name__ == "__main__":
    main()
