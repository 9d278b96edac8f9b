"""What the benchmark scripts that start their own processes share: a free port on
127.0.0.1, waiting for a started process to listen on one, stopping it, a process's
children and their CPU time, a PostgreSQL server's CPU time and its count of stored
requests, an embedded PostgreSQL pinned away from the proxy's CPU, a fast upstream that
gives every request the same answer (``python bench/localhost.py PORT`` serves one), and
the 1 KB JSON request body with the wrk script that POSTs it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# 1,021 bytes of valid JSON (a cut one would send every batch down the checking path)
BODY = '{"features": {' + ", ".join(f'"f{i}": {i}.5' for i in range(79)) + "}}"
ANSWER = b'{"prediction": 1.0, "model": "fast"}'
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(ANSWER), ANSWER))


def serve_fixed(port: int, response: bytes = RESPONSE, *, backlog: int = 4096,
                ready: bool = False, delay_s: float = 0.0) -> None:
    """Answer every request on 127.0.0.1:``port`` with ``response`` (a whole HTTP/1.1
    response), on uvloop and httptools, until killed, ``delay_s`` after it arrived (a
    model's time, costing no CPU); with ``ready``, print "ready" once listening."""
    import httptools
    import uvloop

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            if delay_s:
                asyncio.get_running_loop().call_later(delay_s, self.answer)
            else:
                self.answer()

        def answer(self) -> None:
            if not self.transport.is_closing():
                self.transport.write(response)  # type: ignore[attr-defined]

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Answer, "127.0.0.1", port,
                                                                 backlog=backlog)
        if ready:
            print("ready", flush=True)
        await server.serve_forever()

    uvloop.run(main())


def start_fast_upstream(cpu: str | None, delay_ms: float = 0
                        ) -> tuple[subprocess.Popen[bytes], int]:
    """A fast upstream in a process of its own, pinned to ``cpu``, answering ``delay_ms``
    after each request; returns it and its port."""
    port = free_port()
    argv = [sys.executable, __file__, str(port), str(delay_ms)]
    proc = subprocess.Popen(["taskset", "-c", cpu, *argv] if cpu is not None else argv)
    wait_for_port(port, 10, proc)
    return proc, port


def post_script(work: Path) -> Path:
    """A wrk script in ``work`` that POSTs ``BODY`` as JSON."""
    script = work / "post.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = {BODY!r}\n'
                      'wrk.headers["Content-Type"] = "application/json"\n')
    return script


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


def process_tree(pid: int) -> list[int]:
    """``pid`` and its direct children (a postmaster's backends, a proxy's workers)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                              text=True).stdout.split()
    return [pid, *map(int, children)]


def cpu_ticks(pids: list[int]) -> tuple[int, int]:
    """(utime, stime) of every thread of ``pids``, in clock ticks; a process that has
    exited since its pid was taken counts nothing."""
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        user, system = user + int(fields[11]), system + int(fields[12])
    return user, system


def server_cpu_seconds(data_directory: str) -> float | None:
    """User and system CPU of the PostgreSQL server whose data directory this is, summed
    over the postmaster, its children (the backends, the WAL writer, the checkpointer) and
    the children it has reaped; None when the server is not on this machine or not readable."""
    try:
        postmaster = int(Path(data_directory, "postmaster.pid").read_text().split()[0])
        fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
        reaped = int(fields[13]) + int(fields[14])  # cutime, cstime: backends that ended
        running = sum(cpu_ticks(process_tree(postmaster)))
        return (reaped + running) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def stored_requests(database_url: str) -> int:
    """Requests in the database at ``database_url`` (0 before a proxy has migrated it)."""
    import asyncpg  # not needed by the upstream this file also serves

    async def count() -> int:
        conn = await asyncpg.connect(database_url)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM shadowproxy.requests"))
        except asyncpg.UndefinedTableError:
            return 0
        finally:
            await conn.close()
    return asyncio.run(count())


def pinned_database(data_dir: Path, cpu: str | None) -> str:
    """Start an embedded PostgreSQL under ``data_dir`` (deleted when this process exits),
    pinned to ``cpu`` beside the load: left on the proxy's CPU, its checkpoints and COPYs
    show up as the proxy's latency."""
    from shadowproxy.store.embedded import start_embedded

    url = start_embedded(data_dir, cleanup="delete")
    if cpu is not None:
        postmaster = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        for pid in process_tree(postmaster):
            os.sched_setaffinity(pid, {int(c) for c in cpu.split(",")})
    return url



def scratch_database(prefix: str) -> str:
    """An embedded PostgreSQL in a new temporary folder (its data deleted when this process
    exits); its connection URL."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)  # as root, the embedded server runs as its own user
    return pinned_database(folder, None)


def stop_database(data_dir: Path) -> None:
    """Stop the server ``pinned_database`` started under ``data_dir``, if it runs (call it
    before removing the folder: the server outlives the bench otherwise)."""
    pid_file = data_dir / "postgres" / "postmaster.pid"
    if pid_file.exists():
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)  # a fast shutdown
            deadline = time.monotonic() + 30
            while pid_file.exists() and time.monotonic() < deadline:
                time.sleep(0.1)

if __name__ == "__main__":
    serve_fixed(int(sys.argv[1]), delay_s=float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0)
