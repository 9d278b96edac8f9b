"""Client latency while the configuration is reloaded every 500 ms, against no reloads.

Starts PostgreSQL (embedded, in a scratch folder, or --database-url), three fast upstreams
(a primary and two shadows: bench/replay_bench.py's raw uvloop + httptools server answering a
fixed JSON body) and ``shadowproxy run`` in front of them, then alternates phases of
``--seconds`` each, ``--rounds`` times:

- ``steady``: wrk (one thread, ``--connections`` keep-alive connections, a 1 KB JSON POST)
  with no reload;
- ``reloading``: the same while the file is rewritten and SIGHUP sent every ``--interval``
  seconds: s1's sample_rate 0 and 1 in turn, s2 removed and added in step with it, the
  redacted field changed every other time. Every configuration calls exactly one shadow and
  redacts one field, so both phases ask the same work of the proxy per request and the
  difference is the reloads' (and the new connections to s2 each time it comes back).

It prints each phase's requests/s, p50, p90 and p99 (wrk's latency distribution), the
median p99 of each kind and their ratio (the target: reloading within 10% of steady), the
reloads applied (``shadowproxy_config_reloads_total``), and the proxy's own account at its
stop (served = written + spooled). The proxy runs on ``--cpu``, the upstreams, wrk and the
embedded PostgreSQL on ``--upstream-cpu`` (``taskset``).

    .venv/bin/python bench/reload_bench.py                  # 2 rounds x 2 phases x 10 s
    .venv/bin/python bench/reload_bench.py --seconds 3 --rounds 1   # a first look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import yaml
from localhost import free_port, pinned_database  # bench/localhost.py

ROOT = Path(__file__).resolve().parents[1]
BODY = json.dumps({"features": {f"f{i}": i * 1.5 for i in range(80)}, "secret": "s3cret"})


def _pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return (["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset")
            else []) + argv


def _config(i: int, *, port: int, admin: int, data_dir: Path, database_url: str,
            upstreams: list[str], workers: int) -> dict[str, Any]:
    """The i-th configuration: s1 at sample_rate i % 2, s2 there when i is even; $.secret
    redacted when (i // 2) % 2, else $.features.f1."""
    shadows = [{"name": "s1", "url": upstreams[1], "sample_rate": float(i % 2)}]
    if i % 2 == 0:
        shadows.append({"name": "s2", "url": upstreams[2]})
    return {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}",
            "data_dir": str(data_dir), "database": {"url": database_url}, "workers": workers,
            "recording": {"redact_json": ["$.secret"] if (i // 2) % 2
                          else ["$.features.f1"]},
            "routes": [{"name": "bench", "primary": {"url": upstreams[0]},
                        "shadows": shadows}]}


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _wrk(url: str, connections: int, seconds: float, cpu: int | None) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\n'
                     'wrk.headers["Content-Type"] = "application/json"\n')
    try:
        out = subprocess.run(
            _pinned(cpu, ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency",
                          "-s", script.name, url]),
            capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    finally:
        os.unlink(script.name)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert rps, out
    result = {"rps": float(rps.group(1))}
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        assert m, out
        result[f"p{pct}"] = float(m.group(1)) * _UNITS[m.group(2)]
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(non2xx.group(1)) if non2xx else 0.0
    if errors:
        result["errors"] += sum(int(n) for n in re.findall(r"\d+", errors.group(1)))
    return result


def _wrk_into(box: dict[str, dict[str, float]], *args: Any) -> None:
    box["result"] = _wrk(*args)


def _metric(admin: int, name: str, label: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read()
    m = re.search(rf'^{name}\{{{label}\}} ([\d.e+]+)$', text.decode(), re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def _wait_ready(admin: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"shadowproxy exited with {proc.returncode}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1).status \
                    == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("shadowproxy did not become ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=2, help="steady + reloading pairs")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between reloads")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cpu", type=int, default=0, help="the proxy's core")
    parser.add_argument("--upstream-cpu", type=int, default=1,
                        help="the core of the upstreams and wrk")
    parser.add_argument("--database-url", default=os.environ.get("SHADOWPROXY_DATABASE_URL"))
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("reload_bench.py needs wrk (apt-get install wrk)")

    tmp = Path(tempfile.mkdtemp(prefix="shadowproxy-reload-bench-"))
    tmp.chmod(0o755)  # as root, the embedded server runs as its own user
    server_url = args.database_url or pinned_database(tmp / "pg", str(args.upstream_cpu))
    name = f"sp_reload_bench_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        conn = await asyncpg.connect(server_url)
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()

    asyncio.run(create())
    url = urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    upstreams: list[subprocess.Popen[str]] = []
    proxy: subprocess.Popen[str] | None = None
    try:
        urls = []
        for _ in range(3):
            port = free_port()
            up = subprocess.Popen(
                _pinned(args.upstream_cpu, [sys.executable, str(ROOT / "bench" /
                                                                "replay_bench.py"),
                                            "--serve", str(port)]),
                stdout=subprocess.PIPE, text=True)
            upstreams.append(up)
            assert up.stdout is not None and up.stdout.readline().strip() == "ready"
            urls.append(f"http://127.0.0.1:{port}")
        port, admin = free_port(), free_port()
        path = tmp / "shadowproxy.yaml"

        def write(i: int) -> None:
            path.write_text(yaml.safe_dump(_config(
                i, port=port, admin=admin, data_dir=tmp / "data", database_url=url,
                upstreams=urls, workers=args.workers)))

        write(0)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("SHADOWPROXY_DATABASE_URL", None)
        proxy = subprocess.Popen(
            _pinned(args.cpu, [sys.executable, "-m", "shadowproxy", "run", "-c", str(path)]),
            env=env, stderr=subprocess.PIPE, text=True)
        _wait_ready(admin, proxy)
        target = f"http://127.0.0.1:{port}/predict"
        _wrk(target, args.connections, 2, args.upstream_cpu)  # warm-up
        results: dict[str, list[dict[str, float]]] = {"steady": [], "reloading": []}
        reloads = 0
        for _ in range(args.rounds):
            results["steady"].append(_wrk(target, args.connections, args.seconds,
                                          args.upstream_cpu))
            # wrk in a thread while this one reloads on schedule.
            box: dict[str, dict[str, float]] = {}
            runner = threading.Thread(target=_wrk_into, args=(
                box, target, args.connections, args.seconds, args.upstream_cpu))
            runner.start()
            end = time.monotonic() + args.seconds
            next_at = time.monotonic() + args.interval
            while time.monotonic() < end - args.interval / 2:
                time.sleep(max(0.0, next_at - time.monotonic()))
                reloads += 1
                write(reloads)
                os.kill(proxy.pid, signal.SIGHUP)
                next_at += args.interval
            runner.join()
            results["reloading"].append(box["result"])
        deadline = time.monotonic() + 10  # the last reload may still be under way
        while True:
            applied = _metric(admin, "shadowproxy_config_reloads_total", 'result="applied"')
            if applied >= reloads or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        rejected = _metric(admin, "shadowproxy_config_reloads_total", 'result="rejected"')
        proxy.send_signal(signal.SIGTERM)
        _, err = proxy.communicate(timeout=60)
        stopped = re.search(r"stopped: served=(\d+) written=(\d+) spooled=(\d+) dropped=(\d+)",
                            err)
    finally:
        if proxy is not None and proxy.poll() is None:
            proxy.kill()
        for up in upstreams:
            up.kill()

    # The proxy's own start line says which build it runs (PYTHONPATH may be a compiled tree).
    build = re.search(r"routes: .* \((pure Python|compiled with mypyc)\)", err)
    print(f"# reload_bench: {datetime.now(UTC).isoformat(timespec='seconds')}, "
          f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"shadowproxy {build.group(1) if build else '?'}, workers {args.workers}")
    print(f"# {' '.join(sys.argv)}")
    print(f"{'phase':<10} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
          f"{'errors':>7}")
    for kind in ("steady", "reloading"):
        for r in results[kind]:
            print(f"{kind:<10} {r['rps']:>9.0f} {r['p50']:>8.2f} {r['p90']:>8.2f} "
                  f"{r['p99']:>8.2f} {r['errors']:>7.0f}")
    steady = statistics.median(r["p99"] for r in results["steady"])
    reloading = statistics.median(r["p99"] for r in results["reloading"])
    print(f"p99 median: steady {steady:.2f} ms, reloading {reloading:.2f} ms, ratio "
          f"{reloading / steady:.3f} (target <= 1.10)")
    print(f"reloads: sent {reloads}, applied {applied:.0f}, rejected {rejected:.0f}")
    if stopped:
        served, written, spooled, dropped = map(int, stopped.groups())
        print(f"records: served {served}, written {written}, spooled {spooled}, "
              f"dropped {dropped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
