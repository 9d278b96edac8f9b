"""Where the proxy's time goes, per request: CPU, system calls, event-loop iterations and
wake-ups under wrk at several connection counts; with ``--callgrind N``, instructions,
allocations and the share of each library, counted (not timed) over N requests.

    python bench/breakdown.py --tree /tmp/compiled                 # 16 and 64 connections
    python bench/breakdown.py --tree /tmp/compiled --callgrind 2000 --conns 16
    python bench/breakdown.py --variants mirrored,primary          # the shadow's share
    python bench/breakdown.py --tree /tmp/compiled --upstream-delay-ms 5   # a 5 ms model
    python bench/breakdown.py --tree /tmp/compiled --libraries --conns 16  # CPU by library

The proxy runs pinned to CPU 0; wrk, two fast upstreams (``bench/localhost.py``) and an
embedded PostgreSQL pinned to CPU 1. System calls are counted by ``perf stat`` on the
kernel's syscall tracepoints for the proxy's process (no sampling, little overhead);
event-loop iterations are the ``epoll_pwait`` calls (libuv polls once per iteration);
wake-ups are the proxy's voluntary context switches (``/proc/PID/status``). Counts are
divided by the requests wrk completed in the same window. The other core's budget is
measured beside it: the CPU time of wrk, of the upstreams and of PostgreSQL per request, and
the share of the window's exchanges stored while it ran (the rest waits in the queue or the
spool, and is stored when the load allows; each variant has a data_dir of its own, so that
none replays another's spool). ``--libraries`` also samples the proxy's stacks with
``perf record`` during the window and splits its CPU per request by library (the kernel,
the interpreter, the compiled modules, uvloop, asyncpg...): unlike callgrind, which slows
the proxy fiftyfold, this works at a model's pace too, where the cost of a request depends
on how the load arrives. ``--write-after-records N`` sets ``recording.write_after_records``
(the size of a batch at a model's pace). Variants: ``mirrored`` (one
shadow, every pair recorded), ``primary`` (no shadow: the primary's answer recorded) and
``nginx`` (nginx's ``mirror`` with keep-alive upstreams, as the side-by-side harness
configures it, measured the same way for comparison).

Counts, unlike seconds, do not move with the machine's load: they are the part of the
breakdown that holds from one machine to the next. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from localhost import (  # bench/localhost.py
    BODY,
    cpu_ticks,
    free_port,
    pinned_database,
    post_script,
    process_tree,
    server_cpu_seconds,
    start_fast_upstream,
    stop,
    stop_database,
    stored_requests,
    wait_for_port,
)

SYSCALLS = ("read", "write", "writev", "recvfrom", "sendto", "sendmsg", "recvmsg",
            "epoll_pwait", "epoll_wait", "epoll_ctl", "accept4", "connect", "socket",
            "close", "setsockopt", "getsockopt", "getsockname", "getpeername", "getpid",
            "futex", "ioctl", "fcntl", "openat", "mmap", "munmap", "brk", "madvise")
ALLOCATORS = ("PyObject_Malloc", "PyObject_Calloc", "PyObject_Realloc", "malloc")


def available_tracepoints() -> list[str]:
    out = subprocess.run(["perf", "list", "tracepoint"], capture_output=True, text=True).stdout
    have = set(re.findall(r"syscalls:sys_enter_(\w+)", out))
    return [name for name in SYSCALLS if name in have]


NGINX = """worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx.error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    keepalive_requests 1000000;
    upstream primary {{ server 127.0.0.1:{primary}; keepalive 128; }}
    upstream shadow {{ server 127.0.0.1:{shadow}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            mirror /_mirror; mirror_request_body on;
            proxy_pass http://primary; proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        location = /_mirror {{
            internal;
            proxy_pass http://shadow$request_uri; proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def voluntary_switches(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with open(task / "status") as status:
                for line in status:
                    if line.startswith("voluntary_ctxt_switches"):
                        total += int(line.split()[1])
    return total


def wrk(port: int, seconds: int, connections: int, script: Path, cpu: str | None) -> int:
    """Run wrk and return the requests it completed."""
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(script),
            f"http://127.0.0.1:{port}/predict"]
    out = subprocess.run((["taskset", "-c", cpu] if cpu else []) + argv,
                         capture_output=True, text=True, check=True).stdout
    match = re.search(r"(\d+) requests in", out)
    if match is None:
        raise SystemExit(f"could not read wrk's output:\n{out}")
    return int(match.group(1))


def write_config(work: Path, name: str, port: int, primary: int, shadow: int | None,
                 database_url: str, write_after: int | None = None) -> Path:
    shadows = ("[]" if shadow is None else
               f'[{{name: shadow, url: "http://127.0.0.1:{shadow}", timeout_s: 1, '
               f'max_in_flight: 1000}}]')
    config = work / f"{name}.yaml"
    config.write_text(f"""listen: "127.0.0.1:{port}"
admin_listen: null
data_dir: "{work / f'data-{name}'}"
database: {{url: "{database_url}"}}
{"" if write_after is None else f"recording: {{write_after_records: {write_after}}}"}
routes:
  - name: bench
    primary: {{url: "http://127.0.0.1:{primary}", timeout_s: 30}}
    shadows: {shadows}
""")
    return config


def start_proxy(args: argparse.Namespace, config: Path, port: int, log: Path,
                prefix: list[str], startup_s: float) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if args.tree:
        env["PYTHONPATH"] = args.tree
    argv = [*prefix, sys.executable, "-m", "shadowproxy", "run", "-c", str(config)]
    if args.proxy_cpu is not None:
        argv = ["taskset", "-c", args.proxy_cpu, *argv]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=config.parent, env=env, stdout=out, stderr=out)
    wait_for_port(port, startup_s, proc)
    return proc


def start_nginx(args: argparse.Namespace, work: Path, port: int, primary: int, shadow: int
                ) -> subprocess.Popen[bytes]:
    config = work / "nginx.conf"
    config.write_text(NGINX.format(work=work, port=port, primary=primary, shadow=shadow))
    argv = ["nginx", "-c", str(config), "-p", str(work)]
    if args.proxy_cpu is not None:
        argv = ["taskset", "-c", args.proxy_cpu, *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, 10, proc)
    return proc


def measure(args: argparse.Namespace, proxy: subprocess.Popen[bytes], port: int,
            connections: int, script: Path, tracepoints: list[str], work: Path
            ) -> dict[str, float]:
    wrk(port, 2, connections, script, args.load_cpu)  # warm-up: pools, caches
    pids = process_tree(proxy.pid)
    perf_out = work / "perf.csv"
    events = ",".join(["raw_syscalls:sys_enter"]
                      + [f"syscalls:sys_enter_{name}" for name in tracepoints])
    perf = subprocess.Popen(["perf", "stat", "-x", ",", "-o", str(perf_out), "-e", events,
                             "-p", ",".join(map(str, pids))])
    sampled = work / "perf.data"
    sampler = (subprocess.Popen(["perf", "record", "-q", "-F", "999", "-o", str(sampled),
                                 "-p", ",".join(map(str, pids))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               if args.libraries else None)
    time.sleep(0.3)  # perf attaches
    stored = stored_requests(args.database_url)
    others, children = other_core_seconds(args), resource.getrusage(resource.RUSAGE_CHILDREN)
    (user, system), switches = cpu_ticks(pids), voluntary_switches(pids)
    requests = wrk(port, args.seconds, connections, script, args.load_cpu)
    user_after, system_after = cpu_ticks(pids)
    switches = voluntary_switches(pids) - switches
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, reaped just now
    others_after = other_core_seconds(args)
    stored = stored_requests(args.database_url) - stored
    perf.send_signal(signal.SIGINT)
    perf.wait(30)
    if sampler is not None:
        sampler.send_signal(signal.SIGINT)
        sampler.wait(60)
    counts: dict[str, float] = {}
    for line in perf_out.read_text().splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].strip().isdigit():
            name = parts[2].split(":")[1].removeprefix("sys_enter_").removeprefix("sys_enter")
            counts[name or "all"] = int(parts[0])
    per = {name: value / requests for name, value in counts.items()}
    per["requests"] = requests
    per["req/s"] = requests / args.seconds
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK") / requests
    per["user_us"] = (user_after - user) * tick_us
    per["system_us"] = (system_after - system) * tick_us
    per["cpu_us"] = per["user_us"] + per["system_us"]
    per["wakeups"] = switches / requests
    per["wrk_us"] = ((children_after.ru_utime - children.ru_utime)
                     + (children_after.ru_stime - children.ru_stime)) * 1e6 / requests
    per["upstreams_us"] = (others_after[0] - others[0]) * 1e6 / requests
    per["postgres_us"] = (others_after[1] - others[1]) * 1e6 / requests
    per["stored_share"] = stored / requests
    if sampler is not None:
        for library, share in library_shares(sampled).items():
            per[f"library:{library}"] = share * per["cpu_us"]
    return per


def library_shares(sampled: Path) -> dict[str, float]:
    """Each library's share of the samples ``perf record`` took (``perf report`` by DSO)."""
    report = subprocess.run(["perf", "report", "-i", str(sampled), "--sort", "dso",
                             "--stdio", "--no-children"], capture_output=True, text=True,
                            check=True).stdout
    shares: dict[str, float] = {}
    for line in report.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+(\S+)", line)
        if match:
            name = match.group(2).removeprefix("[").removesuffix("]")
            name = name.split(".cpython")[0].split(".so")[0]
            key = LIBRARIES.get(name, name)
            shares[key] = shares.get(key, 0.0) + float(match.group(1)) / 100
    return shares


LIBRARIES = {"kernel.kallsyms": "kernel", "libpython3.11": "interpreter",
             "shadowproxy_native__mypyc": "shadowproxy (compiled)", "parser": "httptools",
             "loop": "uvloop", "protocol": "asyncpg", "pgproto": "asyncpg",
             "_pickle": "pickle (spool)"}
"""Friendlier names of the libraries in ``perf report``'s DSO column."""


def other_core_seconds(args: argparse.Namespace) -> tuple[float, float]:
    """CPU seconds so far of the upstreams and of the PostgreSQL server."""
    upstreams = sum(cpu_ticks(args.upstream_pids)) / os.sysconf("SC_CLK_TCK")
    return upstreams, server_cpu_seconds(args.pgdata) or 0.0


def callgrind(args: argparse.Namespace, config: Path, port: int, work: Path,
              connections: int) -> None:
    """Instructions and allocations per request, and their split by library, counted by
    callgrind over ``args.callgrind`` requests (hey -n): the counters are zeroed after a
    warm-up and dumped after the measured requests."""
    out_file = work / "callgrind.out"
    prefix = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}"]
    proxy = start_proxy(args, config, port, work / "callgrind.log", prefix, 600)
    try:
        hey = ["hey", "-m", "POST", "-T", "application/json", "-d", BODY,
               "-c", str(connections)]
        url = f"http://127.0.0.1:{port}/predict"
        subprocess.run([*hey, "-n", "400", url], capture_output=True, check=True)
        subprocess.run(["callgrind_control", "-z", str(proxy.pid)],
                       capture_output=True, check=True)
        subprocess.run([*hey, "-n", str(args.callgrind), url], capture_output=True,
                       check=True)
        subprocess.run(["callgrind_control", "-d", str(proxy.pid)],
                       capture_output=True, check=True)
    finally:
        stop(proxy, 300)
    dumps = sorted(work.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise SystemExit(f"callgrind wrote no dump in {work}")
    if args.keep:
        shutil.copy(dumps[-1], args.keep)
    total, by_object, by_function, calls = read_callgrind(dumps[-1])
    n = args.callgrind
    print(f"\ncallgrind, {n:,} requests at {connections} connections: "
          f"{total / n:,.0f} instructions per request")
    print("allocator calls per request: " + ", ".join(
        f"{name} {calls[name] / n:,.0f}" for name in ALLOCATORS))
    print("\n| library | instructions per request | share |\n|---|---:|---:|")
    for name, cost in by_object.most_common(12):
        print(f"| {name} | {cost / n:,.0f} | {cost / total:.1%} |")
    print("\n| function (exclusive) | instructions per request | share |\n|---|---:|---:|")
    for name, cost in by_function.most_common(25):
        print(f"| `{name[:90]}` | {cost / n:,.0f} | {cost / total:.1%} |")


def read_callgrind(path: Path) -> tuple[int, Counter[str], Counter[str], Counter[str]]:
    """Exclusive cost by object file and by function, and calls to each callee, from a
    callgrind output file (names are compressed as ``(id) name`` on first use)."""
    names: dict[str, dict[str, str]] = {"ob": {}, "fn": {}}
    by_object: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    obj = fn = callee = ""
    pending_call = False
    spec = re.compile(r"^(c?)(ob|fn)=\((\d+)\)(?: (.*))?$")
    for line in path.read_text(errors="replace").splitlines():
        match = spec.match(line)
        if match:
            called, kind, ident, name = match.groups()
            table = names[kind]
            if name is not None:
                table[ident] = name
            resolved = table.get(ident, ident)
            if kind == "fn" and called:
                callee = resolved
            elif kind == "fn":
                fn = resolved
            elif not called:
                obj = Path(resolved).name
            continue
        if line.startswith("calls="):
            calls[callee] += int(line[6:].split()[0])
            pending_call = True  # the next cost line is the call's inclusive cost
            continue
        if line and (line[0].isdigit() or line[0] in "+-*"):
            parts = line.split()
            if len(parts) >= 2 and not pending_call:
                cost = int(parts[1])
                by_object[obj] += cost
                by_function[fn] += cost
            pending_call = False
    return sum(by_object.values()), by_object, by_function, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", default=None, help="run the proxy from this source tree")
    parser.add_argument("--conns", default="16,64")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--variants", default="mirrored,primary,nginx")
    parser.add_argument("--callgrind", type=int, default=0,
                        help="also count instructions over this many requests")
    parser.add_argument("--keep", default=None,
                        help="copy callgrind's dump here (for callgrind_annotate --inclusive)")
    parser.add_argument("--upstream-delay-ms", type=float, default=0,
                        help="the upstreams answer this long after each request (a model's "
                             "time, costing no CPU)")
    parser.add_argument("--write-after-records", type=int, default=None,
                        help="recording.write_after_records (default: the product's)")
    parser.add_argument("--libraries", action="store_true",
                        help="also split the proxy's CPU per request by library (perf "
                             "record)")
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args()
    for tool in ("wrk", "perf") + (("valgrind", "hey") if args.callgrind else ()):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (Debian: apt-get install "
                             f"{'linux-perf' if tool == 'perf' else tool})")
    pin = not args.no_pin and shutil.which("taskset") is not None and os.cpu_count() != 1
    args.proxy_cpu, args.load_cpu = ("0", "1") if pin else (None, None)
    tracepoints = available_tracepoints()
    work = Path(tempfile.mkdtemp(prefix="shadowproxy-breakdown-"))
    work.chmod(0o755)  # the embedded PostgreSQL may run as its own user
    script = post_script(work)
    upstreams = []
    rows: list[tuple[str, int, dict[str, float]]] = []
    try:
        for _ in range(2):
            upstreams.append(start_fast_upstream(args.load_cpu, args.upstream_delay_ms))
        (_, primary), (_, shadow) = upstreams
        database_url = pinned_database(work / "pg", args.load_cpu)
        args.database_url, args.pgdata = database_url, str(work / "pg" / "postgres")
        args.upstream_pids = [proc.pid for proc, _ in upstreams]
        conns = [int(c) for c in args.conns.split(",")]
        for variant in filter(None, args.variants.split(",")):
            port = free_port()
            if variant == "nginx":
                proxy = start_nginx(args, work, port, primary, shadow)
            else:
                config = write_config(work, variant, port, primary,
                                      shadow if variant == "mirrored" else None,
                                      database_url, args.write_after_records)
                proxy = start_proxy(args, config, port, work / f"{variant}.log", [], 60)
            try:
                for connections in conns:
                    rows.append((variant, connections, measure(
                        args, proxy, port, connections, script, tracepoints, work)))
            finally:
                stop(proxy)
        if args.callgrind:
            port = free_port()
            config = write_config(work, "callgrind", port, primary, shadow, database_url)
            callgrind(args, config, port, work, conns[0])
    finally:
        for proc, _ in upstreams:
            stop(proc, 10)
        stop_database(work / "pg")
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows, tracepoints)


def print_table(rows: list[tuple[str, int, dict[str, float]]], tracepoints: list[str]) -> None:
    seen = [name for name in tracepoints if any(r.get(name, 0) >= 0.005 for _, _, r in rows)]
    print(f"\n{'':s}Per request (wrk, POST 1 KB; the proxy's process only):\n")
    print("| variant | conns | req/s | CPU µs | of it in the kernel | wake-ups | syscalls | "
          + " | ".join(seen) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(seen))
    for variant, connections, r in rows:
        print(f"| {variant} | {connections} | {r['req/s']:,.0f} | {r['cpu_us']:.1f} | "
              f"{r['system_us']:.1f} | "
              f"{r['wakeups']:.2f} | {r.get('all', 0):.2f} | "
              + " | ".join(f"{r.get(name, 0):.2f}" for name in seen) + " |")
    print("\nThe other core, per request (wrk, the two upstreams and PostgreSQL share it):\n")
    print("| variant | conns | wrk µs | upstreams µs | PostgreSQL µs | sum µs | busy at this "
          "rate | stored during the window |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for variant, connections, r in rows:
        other = r["wrk_us"] + r["upstreams_us"] + r["postgres_us"]
        stored = "–" if variant == "nginx" else f"{r['stored_share']:.0%}"
        print(f"| {variant} | {connections} | {r['wrk_us']:.1f} | {r['upstreams_us']:.1f} | "
              f"{r['postgres_us']:.1f} | {other:.1f} | {other * r['req/s'] / 1e6:.0%} | "
              f"{stored} |")
    totals: dict[str, float] = {}  # (--libraries) each library's µs over all rows
    for _, _, r in rows:
        for key, value in r.items():
            if key.startswith("library:"):
                totals[key] = totals.get(key, 0.0) + value
    if totals:
        names = sorted(totals, key=totals.__getitem__, reverse=True)[:8]
        print("\nThe proxy's CPU µs per request by library (perf record, 999 samples a "
              "second):\n")
        print("| variant | conns | " + " | ".join(n.removeprefix("library:") for n in names)
              + " | the rest |\n|---|---:|" + "---:|" * (len(names) + 1))
        for variant, connections, r in rows:
            shown = [r.get(name, 0.0) for name in names]
            rest = sum(v for k, v in r.items() if k.startswith("library:")) - sum(shown)
            print(f"| {variant} | {connections} | "
                  + " | ".join(f"{v:.1f}" for v in shown) + f" | {rest:.1f} |")


if __name__ == "__main__":
    main()
