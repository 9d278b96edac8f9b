"""What the benchmark scripts that start their own processes share: a free port on
127.0.0.1, waiting for a started process to listen on one, stopping it, and a fast upstream
that gives every request the same answer."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time


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


def serve_fixed(port: int, response: bytes, *, backlog: int, ready: bool = False) -> None:
    """Answer every request on 127.0.0.1:``port`` with ``response`` (a whole HTTP/1.1
    response), on uvloop and httptools, until killed; with ``ready``, print "ready" once
    listening."""
    import httptools
    import uvloop

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            self.transport.write(response)  # type: ignore[attr-defined]

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Answer, "127.0.0.1", port,
                                                                 backlog=backlog)
        if ready:
            print("ready", flush=True)
        await server.serve_forever()

    uvloop.run(main())
