"""What the benchmark scripts that start their own processes share: a free port on
127.0.0.1, waiting for a started process to listen on one, stopping it, and an embedded
PostgreSQL pinned away from the proxy's CPU."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, seconds: float, proc: subprocess.Popen[bytes]) -> None:
    """Return once something accepts on 127.0.0.1:``port``; exit if ``proc`` ends first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited with status {proc.returncode} before listening")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {seconds:.0f} s")


def stop(proc: subprocess.Popen[bytes], seconds: float = 60) -> None:
    """SIGTERM (a graceful stop), then SIGKILL if it outlasts ``seconds``."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def pinned_database(data_dir: Path, cpu: str | None) -> str:
    """Start an embedded PostgreSQL under ``data_dir`` (deleted when this process exits),
    pinned to ``cpu`` beside the load: left on the proxy's CPU, its checkpoints and COPYs
    show up as the proxy's latency."""
    from shadowproxy.store.embedded import start_embedded

    url = start_embedded(data_dir, cleanup="delete")
    if cpu is not None:
        postmaster = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True,
                                  text=True).stdout.split()
        for pid in (postmaster, *map(int, children)):
            os.sched_setaffinity(pid, {int(c) for c in cpu.split(",")})
    return url
