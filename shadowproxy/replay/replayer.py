"""The replay loop: read ahead, pace, send, record; stop cleanly on Ctrl-C.

A reader task fetches the pending requests (``source.RequestStream``) into a queue of at
most ``READ_AHEAD_PAGES`` pages; the loop takes them in order, waits for each one's due
time (``pacing``) and for a free slot under ``--concurrency``, and starts its call on a
keep-alive pool to the target. Each answer, or failure, becomes a response-only record
(``Exchange.request_stored``) handed to the same recorder the proxy uses: batched COPY,
redaction, the spool while the database is away. Sending waits while the recorder is
behind, so that no record is dropped for the replay's speed: an answer the recorder's queue
has no room for (``recording.queue_max_records`` or ``queue_max_bytes``, which large
answers reach long before ``RECORDER_BACKLOG`` records) is held here until it has, and
nothing more is sent meanwhile.

Exactly once: an answer is stored under the primary key (request, target, received_at: the
request's), and a request is pending only while it has none. A run stopped anywhere
(Ctrl-C, kill -9) leaves every request either stored or pending, and the next run sends the
pending ones: a request may reach the target twice (sent, then killed before its answer
was stored), it is never stored twice.

Ctrl-C (or SIGTERM) once: nothing more is sent, the calls in flight finish (each within
``--timeout``) and are stored. Twice: the calls in flight are abandoned, not stored, and
stay pending for the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shadowproxy.config import Limits, RecordingConfig
from shadowproxy.errors import ShadowProxyError
from shadowproxy.failures import ErrorKind
from shadowproxy.http1 import IDEMPOTENT_METHODS
from shadowproxy.metrics import Metrics
from shadowproxy.models import CapturedResponse, Exchange
from shadowproxy.recorder.recorder import Recorder
from shadowproxy.replay.call import ReplayCall
from shadowproxy.replay.options import ReplayOptions
from shadowproxy.replay.outgoing import Outgoing, RequestBuilder, Skip
from shadowproxy.replay.pacing import Pacer
from shadowproxy.replay.source import RequestStream
from shadowproxy.runner import ignore_ctrl_c_from_now
from shadowproxy.tasks import spawn
from shadowproxy.upstream import UpstreamPool

READ_AHEAD_PAGES = 2
RECORDER_BACKLOG = 5_000
"""Records waiting in the recorder's queue above which sending pauses."""
_YIELD_EVERY = 64
_MIN_WAIT_S = 0.0005


@dataclass
class Tally:
    """What happened to the requests of one run (the progress bar and the summary)."""

    sent: int = 0
    answered: int = 0
    """Calls that got a complete response, whatever its status."""
    statuses: Counter[str] = field(default_factory=Counter)
    """Answers by status class: "2xx", "4xx", ..."""
    errors: Counter[str] = field(default_factory=Counter)
    """Calls without a complete response, by ``ErrorKind``."""
    skipped: Counter[str] = field(default_factory=Counter)
    """Requests not sent, by reason."""
    without_redacted: int = 0
    """Requests sent without headers that were stored as "[redacted]"."""
    replaced: int = 0
    """Earlier answers removed by --force."""
    abandoned: int = 0
    """Calls given up at a second Ctrl-C (and answers still held back from the recorder
    then): not stored, pending for the next run."""
    recorded: int = 0
    """Records handed to the recorder (answers, failures and skips)."""

    @property
    def done(self) -> int:
        """Requests handled: recorded or abandoned."""
        return self.recorded + self.abandoned

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


class Replayer:
    """One run of the replay: from the opened stream to the last record handed on."""

    def __init__(self, options: ReplayOptions, recording: RecordingConfig, data_dir: Path,
                 database_url: str, stream: RequestStream, pacer: Pacer,
                 limits: Limits | None = None) -> None:
        self.options = options
        self.recording = recording
        self.limits = limits or Limits()
        self.data_dir = data_dir
        self.database_url = database_url
        self.stream = stream
        self.pacer = pacer
        self.tally = Tally()
        self.stopping = False
        self.aborting = False
        self.recorder: Recorder | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: UpstreamPool | None = None
        self._in_flight = 0
        self._held: deque[Exchange] = deque()
        """Records the recorder's queue had no room for, in order (``_record``)."""
        self._wake: asyncio.Future[None] | None = None
        """Resolved when a slot frees up, a wait is over, or a stop is asked for."""
        self.read_error: ShadowProxyError | None = None
        """Why reading the requests failed, if it did (raised once the rest is stored)."""

    # --- signals ---
    def interrupt(self) -> None:
        """Ctrl-C: first stop sending, then abandon the calls in flight."""
        if self.stopping:
            self.aborting = True
            if self._pool is not None:
                self._pool.abort_active()
        self.stopping = True
        self._wake_up()

    def _wake_up(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _wait(self, timeout: float | None) -> None:
        """Until woken (a slot, a stop) or ``timeout`` seconds."""
        loop = self._loop
        assert loop is not None
        wake = self._wake = loop.create_future()
        handle = loop.call_later(timeout, self._wake_up) if timeout is not None else None
        try:
            await wake
        finally:
            if handle is not None:
                handle.cancel()

    # --- the run ---
    async def run(self, on_start: Callable[[Tally], None] | None = None) -> Tally:
        loop = self._loop = asyncio.get_running_loop()
        # The end waits for the database as a proxy's stop does: ``limits.shutdown_grace_s``,
        # then what is left goes to the spool.
        recorder = self.recorder = Recorder(self.recording, self.database_url, self.data_dir,
                                            Metrics(),
                                            stop_grace_s=self.limits.shutdown_grace_s)
        await recorder.start()
        self._pool = UpstreamPool(loop, self.options.url, self.options.name, self.limits)
        pages: asyncio.Queue[list[Any] | None] = asyncio.Queue(READ_AHEAD_PAGES)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.interrupt)
        reader = spawn(self._read(pages), name="replay-reader")
        if on_start is not None:
            on_start(self.tally)
        try:
            await self._send_all(pages)
            while self._in_flight:
                await self._wait(None)
            while self._held and not self.aborting:
                self._release_held()
                if self._held:
                    await self._wait(0.05)
            if self.aborting:
                self.tally.abandoned += len(self._held)
                self._held.clear()
            if self.read_error is not None:
                raise self.read_error
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await self.stream.close()
            loop.remove_signal_handler(signal.SIGTERM)
            if self.stopping:
                # Interrupted: the end stores what was answered, within the grace, and a
                # Ctrl-C pressed again must not cut it (SIGINT's default raised
                # KeyboardInterrupt in the recorder's task).
                ignore_ctrl_c_from_now(loop)
            else:
                loop.remove_signal_handler(signal.SIGINT)
            self._pool.close()
            await recorder.close()
            # Replaced as each new answer was stored (PostgresWriter, ``replay --force``).
            self.tally.replaced = recorder.writer.replaced
        return self.tally

    async def _read(self, pages: asyncio.Queue[list[Any] | None]) -> None:
        """Fill ``pages``, then put None; a failure is kept for ``run`` to raise once the
        calls in flight are stored."""
        try:
            while True:
                rows = await self.stream.next_rows()
                if not rows:
                    break
                await pages.put(rows)
        except ShadowProxyError as exc:
            self.read_error = exc
        except Exception as exc:  # whatever it is, the loop must learn of it and end
            self.read_error = ShadowProxyError(f"reading the recorded requests failed: {exc!r}")
        await pages.put(None)

    async def _send_all(self, pages: asyncio.Queue[list[Any] | None]) -> None:
        options = self.options
        pool = self._pool
        recorder = self.recorder
        assert pool is not None and recorder is not None
        builder = RequestBuilder(options, pool.host_header, pool.base_path)
        pacer = self.pacer
        concurrency = options.concurrency
        started: float | None = None
        since_yield = 0
        while not self.stopping:
            rows = await self._next_page(pages)
            if rows is None:
                return
            for row in rows:
                built = builder.build(row)
                if isinstance(built, Skip):
                    # Not sent: it takes no place in the schedule (--rate is the rate of the
                    # requests sent) and no call slot; only the recorder's backlog holds it.
                    while self._backlogged() and not self.stopping:
                        await self._wait(0.05)
                        since_yield = 0
                    if self.stopping:
                        return
                    self._skip(row, built)
                else:
                    due = pacer.due(row["received_at"].timestamp())
                    if started is None:
                        started = time.perf_counter()
                    # Woken early by an answer: wait on until the request is due.
                    while (wait := started + due - time.perf_counter()) > _MIN_WAIT_S \
                            and not self.stopping:
                        await self._wait(wait)
                        since_yield = 0
                    while (self._in_flight >= concurrency
                           or self._backlogged()) and not self.stopping:
                        await self._wait(0.05 if self._in_flight < concurrency else None)
                        since_yield = 0
                    if self.stopping:
                        return
                    self._send(row, built)
                since_yield += 1
                if since_yield >= _YIELD_EVERY:  # let the answers in between sends
                    since_yield = 0
                    await asyncio.sleep(0)

    async def _next_page(self, pages: asyncio.Queue[list[Any] | None]) -> list[Any] | None:
        """The next page of rows; None at the end, or as soon as a stop is asked for."""
        if not pages.empty():
            return pages.get_nowait()
        getter = asyncio.ensure_future(pages.get())
        try:
            while not getter.done():
                if self.stopping:
                    return None
                assert self._loop is not None
                wake = self._wake = self._loop.create_future()
                await asyncio.wait((getter, wake), return_when=asyncio.FIRST_COMPLETED)
            return getter.result()
        finally:
            getter.cancel()

    def _exchange(self, row: Any) -> tuple[Exchange, CapturedResponse]:
        """The stored request of ``row`` (not written again), and the target's record."""
        options = self.options
        exchange = Exchange(options.route, row["received_at"].timestamp(), row["method"],
                            row["path"], row["query"], [], row["client_addr"],
                            row["request_id"])
        exchange.id = row["id"]
        exchange.request_stored = True
        return exchange, CapturedResponse(options.name, "replay", time.time())

    def _skip(self, row: Any, skip: Skip) -> None:
        exchange, record = self._exchange(row)
        exchange.responses.append(record)
        record.error_kind = ErrorKind.SKIPPED
        record.error = f"skipped: {skip.reason}"
        self.tally.skipped[skip.reason] += 1
        self._record(exchange)

    def _send(self, row: Any, built: Outgoing) -> None:
        options = self.options
        exchange, record = self._exchange(row)
        tally = self.tally
        if built.dropped_redacted:
            tally.without_redacted += 1
        tally.sent += 1
        self._in_flight += 1
        assert self._pool is not None
        # Sent once more on a keep-alive connection found closed only when that is safe,
        # as the proxy does (a replay may still reach the target twice; it is stored once).
        method = row["method"].encode("latin-1")
        self._pool.start(ReplayCall(exchange, record, built.head, built.body,
                                    options.timeout_s, built.expect_no_body,
                                    method in IDEMPOTENT_METHODS,
                                    self.recording.max_body_bytes,
                                    options.max_duration_s, self._finished))

    def _finished(self, call: ReplayCall) -> None:
        self._in_flight -= 1
        record = call.record
        tally = self.tally
        if self.aborting and record.error_kind == ErrorKind.SHUTDOWN:
            tally.abandoned += 1  # not an answer of the target's: left pending
        else:
            if record.error_kind is not None:
                tally.errors[str(record.error_kind)] += 1
            else:
                tally.answered += 1
                tally.statuses[f"{(record.status or 0) // 100}xx"] += 1
            self._record(call.exchange)
        self._wake_up()

    def _record(self, exchange: Exchange) -> None:
        """Hand the record to the recorder; held back, in order, while its queue has no
        room (it would drop the record, and the answer would be lost to this run)."""
        recorder = self.recorder
        assert recorder is not None
        if self._held or not recorder.has_room(exchange):
            self._held.append(exchange)
            return
        recorder.submit(exchange)
        self.tally.recorded += 1

    def _release_held(self) -> None:
        """Hand on the held records the recorder's queue has room for now."""
        recorder = self.recorder
        assert recorder is not None
        held = self._held
        while held and recorder.has_room(held[0]):
            recorder.submit(held.popleft())
            self.tally.recorded += 1

    def _backlogged(self) -> bool:
        """Whether sending waits for the recorder: records held back, or a long queue."""
        assert self.recorder is not None
        if self._held:
            self._release_held()
        return bool(self._held) or len(self.recorder.queue) >= RECORDER_BACKLOG
