"""A real TCP link on 127.0.0.1 to the test PostgreSQL that can go silent, for tests of a
database that stops answering mid-conversation (a network partition, a hung server).

``DatabaseLink(url)`` forwards bytes both ways between its clients and the server (a Unix
socket of the embedded server or a TCP address); ``freeze_on(marker)`` makes it swallow the
first client message holding ``marker`` and everything after it, both ways, on every
connection, while keeping the sockets open: the client waits for an answer that never
comes, as it would behind a partition. ``thaw()`` ends the partition for connections made
from then on (the silent ones stay silent, as a peer's lost TCP state would leave them), so
a client that gives up on its connection and opens a new one is answered again.

``stall=True`` makes the silence that of a real partition for a client that sends much:
nothing more is read from a silent connection, so that the kernel's buffers fill and the
client's writes block (its transport pauses writing), as they do when no segment is
acknowledged. Without it the link reads and discards, and a large COPY is sent in full.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


class DatabaseLink:
    def __init__(self, url: str, *, stall: bool = False) -> None:
        self._target_url = url
        self._stall = stall
        self._marker: bytes | None = None
        self.frozen = asyncio.Event()
        """Set once the link went silent (it stays set after ``thaw``)."""
        self._silent = False
        self._silenced: list[asyncio.Event] = []
        """One per connection: set when that connection went silent (for good)."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.connections = 0
        """Connections the link has accepted so far."""
        self.url = ""

    def freeze_on(self, marker: bytes) -> None:
        """Go silent from the first client message that holds ``marker``."""
        self._marker = marker

    def freeze(self) -> None:
        """Go silent now, on every open connection and every new one."""
        self._silent = True
        self.frozen.set()
        for silenced in self._silenced:
            silenced.set()

    def thaw(self) -> None:
        """Answer connections made from now on; those that went silent stay silent."""
        self._marker = None
        self._silent = False

    async def _open_target(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        parts = urlsplit(self._target_url)
        query = dict(parse_qsl(parts.query))
        host = query.get("host") or parts.hostname or "127.0.0.1"
        port = int(query.get("port") or parts.port or 5432)
        if host.startswith("/"):
            return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        return await asyncio.open_connection(host, port)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    from_client: bool, silenced: asyncio.Event) -> None:
        while True:
            if from_client and self._stall and silenced.is_set():
                await asyncio.Event().wait()  # read nothing more: the buffers fill up
            data = await reader.read(65536)
            if not data:
                break
            marker = self._marker
            if from_client and marker is not None and marker in data:
                self.freeze()
            if silenced.is_set():
                continue  # swallowed: the other side waits for ever
            writer.write(data)
            await writer.drain()
        if not silenced.is_set():
            writer.close()

    async def _serve(self, client_r: asyncio.StreamReader,
                     client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        silenced = asyncio.Event()
        if self._silent:
            silenced.set()
        self._silenced.append(silenced)
        self._writers.append(client_w)
        if silenced.is_set():  # a new connection behind the partition: never answered
            server_r, server_w = asyncio.StreamReader(), None
        else:
            server_r, server_w = await self._open_target()
            self._writers.append(server_w)
        pumps = [asyncio.create_task(self._pump(server_r, client_w, False, silenced))]
        if server_w is not None:
            pumps.append(asyncio.create_task(self._pump(client_r, server_w, True, silenced)))
        else:
            pumps.append(asyncio.create_task(self._swallow(client_r)))
        self._tasks.update(pumps)
        await asyncio.gather(*pumps, return_exceptions=True)

    @staticmethod
    async def _swallow(reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass

    async def __aenter__(self) -> DatabaseLink:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(self._target_url)
        query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "port")]
        user = parts.username or "postgres"
        auth = f"{user}:{parts.password}" if parts.password else user
        self.url = urlunsplit(parts._replace(netloc=f"{auth}@127.0.0.1:{port}",
                                             query=urlencode(query)))
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        await self._server.wait_closed()
