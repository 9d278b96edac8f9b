"""The recorder: a bounded queue, one writer task, the database or the spool.

``submit`` is called by the data path for every finished exchange and never blocks: over
``queue_max_records`` records, or ``queue_max_bytes`` of captured heads and bodies, the
record is dropped and counted. The writer task writes what has gathered as soon as
``write_after_records`` are waiting, or after ``flush_interval_ms``; what arrives during a
write goes in the next batch, up to ``batch_max_records`` (a natural group commit). Small,
frequent batches keep the database's work steady instead of bursty. When a write fails the
batch goes to the spool at once (the writer never holds records in memory while it
retries), and a replay task brings spooled batches into the database when it is back. When
the database is up but slower than the traffic, one batch stays on its way to PostgreSQL and
only the excess goes to the spool: a batch taken while the queue is half full (in records or
in bytes) and the previous write still runs is appended to the spool instead of waiting.
The replay task brings spooled batches in when the live writes leave the database room, so
the spool costs only what the database could not take. While the queue is past half its
bound the writer works in longer turns of the loop, so that on a saturated core it keeps up
with the requests; a full queue is logged by the writer, never by the data path.

Recording rules (redaction, body limits) are those of the configuration each exchange
arrived under: a reload makes its rules the running ones with ``use_rules``, which returns
them as a ``RowEncoder``; the routes compiled for that configuration hold it, and each
exchange takes a reference to it from its route (``Exchange.rules``). An exchange still in
flight after any number of reloads is then stored as its own configuration says, and the
rules of a configuration are freed with its last route and exchange (no fixed number of
versions kept: a long stream may outlive any number of reloads, a sample_rate ramp, and
must not be stored less redacted than configured when it arrived).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from pathlib import Path

from shadowproxy.config import RecordingConfig
from shadowproxy.errors import DatabaseError, SpoolError, UnreadableFrame
from shadowproxy.logs import Throttle
from shadowproxy.metrics import Metrics
from shadowproxy.models import Exchange
from shadowproxy.recorder import bodies
from shadowproxy.recorder.access import log_exchanges
from shadowproxy.recorder.postgres import REFUSED, PostgresWriter
from shadowproxy.recorder.rows import UNEXPECTED, Row, RowEncoder, Withheld, frame_rows
from shadowproxy.recorder.spool import Spool, frame_bytes, frames
from shadowproxy.store.database import TRANSIENT, ConnectionProblem, classify
from shadowproxy.tasks import spawn

log = logging.getLogger("shadowproxy.recorder")

_REPLAY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
_PERMANENT_RETRY_S = 60.0
"""How often a database refusing the proxy for good (a wrong password, say) is tried again:
seldom, as it only passes when the operator fixes it, and then it is picked up within this."""
_CANNOT_REDACT = ", so the fields of recording.redact_json could not be found in it"
_WHY = {
    bodies.ENCODING: "its content-encoding could not be undone" + _CANNOT_REDACT,
    bodies.NOT_UTF8: "it is not UTF-8 text" + _CANNOT_REDACT,
    bodies.INVALID_JSON: "it is not valid JSON" + _CANNOT_REDACT,
    bodies.TOO_DEEP: "it is nested too deeply to read" + _CANNOT_REDACT,
    REFUSED: "PostgreSQL refused a value of the record, which is stored without its bodies "
             "and headers",
    UNEXPECTED: "encoding the record failed unexpectedly; it is stored without its bodies "
                "and headers",
}
_ENCODE_SLICE = 32
_CATCH_UP = 4
"""While the queue is past its overflow mark, the writer encodes and pickles this many times
more per turn of the loop. A saturated core gives the writer one turn between rounds of
requests, and at 32 records a turn it fell behind a proxy serving 16,000 requests a second
(the queue reached its bound and records were dropped); longer turns there cost the clients
some throughput, at a load that already costs them latency, and keep the records."""
ADOPT_EVERY_S = 10.0
"""How often a running recorder takes over the spool segments of processes that stopped
since it started (``Spool.adopt_orphans``): the workers of a supervisor that was killed
drain their queues into the spool while the next supervisor's workers start, and a
``shadowproxy replay`` on the same data_dir leaves its own; adopted at start-up only, they
waited in the spool until the next restart."""
START_CHECK_S = 3.0
"""How long the start waits for the database to answer its connection before it serves and
spools."""
_CLOSE_AT_LEAST_S = 0.2
"""How long the stop gives the database connection's polite close when the grace is spent
(an idle connection to a database that answers closes in a millisecond)."""


class Recorder:
    """Owns the queue, the writer task, the database writer and the spool."""

    def __init__(self, recording: RecordingConfig, database_url: str, data_dir: Path,
                 metrics: Metrics, *, log_exchanges: bool = False,
                 stop_grace_s: float = 10.0, rules: RowEncoder | None = None) -> None:
        """``rules``: the recording rules the routes of the first configuration hold (made
        from ``recording`` if not given)."""
        self.config = recording
        self.queue: deque[Exchange] = deque()
        self.metrics = metrics
        metrics.queue_depth = lambda: len(self.queue)
        self.encoder = rules if rules is not None else RowEncoder(recording)
        """The rules of the running configuration (and of exchanges that hold none: those
        of ``shadowproxy replay``)."""
        self.log_exchanges = log_exchanges
        """Log one line per exchange (``access_log``), written here, off the client's path."""
        self.writer = PostgresWriter(database_url)
        self.spool = Spool(data_dir / "spool", recording.spool_max_bytes)
        self.database_ok = False
        """True while batches go straight to PostgreSQL; False while it is unreachable and
        every batch is spooled."""
        self.problem: ConnectionProblem | None = None
        """Why the database cannot be used, while it cannot: transient (an outage) or
        permanent (a configuration only the operator can fix)."""
        metrics.database_state = self.database_state
        self.spool_full = False
        """True when the last batch found the spool at its cap, or could not be written to
        it (and was dropped)."""
        self._spool_failing: int | None = None
        """Records dropped since a spool write last failed (a full disk), while none has
        succeeded since; None while writes succeed."""
        self.overflowing = False
        """True from the first batch spooled because the database was behind (up, but slower
        than the traffic) until the replay has brought the spool in."""
        self.stop_grace_s = stop_grace_s
        """At a stop, how long the database gets to take the queue and then the spool
        (``limits.shutdown_grace_s``, which a reload changes: ``Proxy.apply``)."""
        self._stop_deadline: float | None = None
        """``loop.time()`` by which a stop stops waiting for the database (set by ``close``):
        what is still queued then goes to the spool, for the next start to store."""
        self._batch_max = recording.batch_max_records
        self._write_after = min(recording.write_after_records, recording.batch_max_records)
        self._queue_max = recording.queue_max_records
        self._overflow_at = max(self._queue_max // 2, self._batch_max)
        self._queue_max_bytes = recording.queue_max_bytes
        self._overflow_bytes = self._queue_max_bytes // 2
        self._queued_bytes = 0
        """Captured body bytes of the exchanges in the queue (the memory they hold)."""
        self._interval = recording.flush_interval_ms / 1000.0
        self._wake = asyncio.Event()
        # The writer's live writes and the replay share one connection (one user at a time);
        # spool appends and the replay's closing of the segment being appended to take turns.
        # Separate locks, so that an excess batch is spooled while a live write runs.
        self._db_lock = asyncio.Lock()
        self._spool_lock = asyncio.Lock()
        self._closing = False
        self._stop_spooling = False
        self._stop_cut_told = False
        self._writer_task: asyncio.Task[None] | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self._adopt_task: asyncio.Task[None] | None = None
        self._replayed = [0, 0, 0]
        """Segments, requests and answers the running replay task has stored (its log line)."""
        self._replaying = False
        """True from starting the replay task until it finds the spool empty (decided under
        ``_spool_lock``, so that a batch appended at that moment starts a new one)."""
        self._batches = 0
        """Batches taken from the queue and not yet in the database or the spool."""
        self._idle = asyncio.Event()
        self._idle.set()
        self._kept_back: set[Path] = set()
        """Segments replayed whose unreadable rest could not be set aside (``_set_aside``)."""
        self._withheld_log = Throttle()
        """Clients choose their bodies: a flood of unreadable ones must not flood the log."""
        self._dropping = 0
        """Records dropped because the queue was full, since the writer last found room."""
        self._dropping_told = False

    # --- the data path's entry ---
    def submit(self, exchange: Exchange) -> None:
        """Queue a finished exchange; never blocks, never raises."""
        queue = self.queue
        size = _captured_bytes(exchange)
        queued = self._queued_bytes + size
        # (An exchange larger than the byte bound still gets in when the queue is empty.)
        if len(queue) >= self._queue_max or (queued > self._queue_max_bytes and queue):
            self.metrics.records["dropped"] += 1
            self._dropping += 1  # (the writer logs it: the data path never logs)
            return
        queue.append(exchange)
        self._queued_bytes = queued
        waiting = len(queue)
        # Wake the writer as the queue crosses a mark (not on every record: a writer waiting
        # on a slow database would otherwise spin once per request).
        if (waiting == self._write_after or waiting == self._overflow_at
                or queued - size < self._overflow_bytes <= queued):
            self._wake.set()

    def has_room(self, exchange: Exchange) -> bool:
        """Whether ``submit`` would queue ``exchange`` now instead of dropping it: for a
        caller that can hold a record back until there is room (``shadowproxy replay``);
        the data path cannot, and does not ask."""
        queue = self.queue
        return not queue or (
            len(queue) < self._queue_max
            and self._queued_bytes + _captured_bytes(exchange) <= self._queue_max_bytes)

    def use_rules(self, recording: RecordingConfig) -> RowEncoder:
        """Make ``recording``'s rules the running ones, and return them for the routes of
        the configuration to hold (``Exchange.rules``). The same rules as running are
        returned as they are (a reload that leaves ``recording`` alone keeps them)."""
        if recording != self.config:
            self.config = recording
            self.encoder = RowEncoder(recording)
        return self.encoder

    def _by_rules(self, part: list[Exchange]) -> list[tuple[RowEncoder, list[Exchange]]]:
        """``part`` in runs of one set of recording rules, each with those rules."""
        runs: list[tuple[RowEncoder, list[Exchange]]] = []
        last: RowEncoder | None = None
        for ex in part:
            encoder = ex.rules if ex.rules is not None else self.encoder
            if encoder is not last:
                runs.append((encoder, []))
                last = encoder
            runs[-1][1].append(ex)
        return runs

    @property
    def spool_failing(self) -> bool:
        """True while writes to the spool fail (a full disk, a read-only file system), not
        merely at its cap: since the last batch that could not be written."""
        return self._spool_failing is not None

    # --- lifecycle ---
    def database_state(self) -> str:
        """'up', or the kind of the problem that keeps records in the spool."""
        if self.database_ok:
            return "up"
        return self.problem.kind if self.problem is not None else TRANSIENT

    async def start(self) -> None:
        """Connect (or start spooling) and start the writer and, if needed, the replayer.
        A database that does not answer within ``START_CHECK_S`` is treated as down: the
        proxy serves at once and spools, and the replayer goes on trying with the writer's
        whole timeout (a database that went silent held the start for that long)."""
        problem = await self.writer.check(START_CHECK_S)
        self.database_ok = problem is None
        self._note_problem(problem, starting=True)
        adopted = self.spool.adopted_at_start
        if adopted:
            log.info("took over %d spool segments of processes that have stopped; they are "
                     "stored as the database takes them", adopted)
        if not self.database_ok or self.spool.has_pending():
            self._start_replay()
        self._writer_task = spawn(self._run(), name="recorder-writer")
        self._adopt_task = spawn(self._adopt(), name="recorder-adopt")

    async def close(self) -> None:
        """Flush everything queued to the database or the spool, then stop, in about
        ``stop_grace_s``: the database gets that long to take the queue, and what is left
        of it to take the spool; what it has not taken by then is on disk, and the next
        start stores it. A write still waiting for the database then is cut and its batch
        spooled too: a database gone silent held it for the writer's whole timeout (15 s),
        past a supervisor's kill."""
        adopt, self._adopt_task = self._adopt_task, None
        if adopt is not None:
            adopt.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await adopt
        loop = asyncio.get_running_loop()
        self._stop_deadline = loop.time() + self.stop_grace_s
        give_up = loop.call_at(self._stop_deadline, self.writer.cut,
                               "no answer from the database within the stop's grace "
                               "(limits.shutdown_grace_s)")
        try:
            await self._flush_at_close()
        finally:
            give_up.cancel()
        self.spool.close()
        # Every record is written or spooled by now: closing the connection gets what is
        # left of the grace (a moment at least). A polite close waited 5 s for a database
        # gone silent, past a supervisor's kill once the queue had used the grace up.
        await self.writer.close(max(_CLOSE_AT_LEAST_S, self._stop_left() or 0.0))

    async def _flush_at_close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._writer_task is not None:
            await self._writer_task
        replay = self._replay_task
        left = self._stop_left()
        if self.database_ok and replay is not None and not replay.done() and left:
            # The database is up, only behind: give it what is left of the grace to take
            # the spooled batches, so that a restart does not leave the last records there.
            log.info("storing the spooled records (up to %.1fs)", left)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(replay), left)
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task

    def _stop_left(self) -> float | None:
        """Seconds left of a stop's grace for the database (0 once it is spent); None while
        no stop is under way."""
        deadline = self._stop_deadline
        if deadline is None:
            return None
        return max(0.0, deadline - asyncio.get_running_loop().time())

    def _stop_overdue(self) -> bool:
        """True once a stop has given the database its grace for the queue."""
        return self._stop_left() == 0.0

    async def drained(self) -> None:
        """Wait until every record submitted so far is in the database or the spool."""
        while self.queue or not self._idle.is_set():
            self._wake.set()
            await asyncio.sleep(self._interval / 4)

    # --- writer ---
    async def _run(self) -> None:
        """Take batches and store them; the next batch is encoded while the previous one
        is on its way to PostgreSQL, so the database and this process work in parallel."""
        storing: asyncio.Task[None] | None = None
        while True:
            if not self.queue and not self._closing:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._interval)
            elif len(self.queue) < self._write_after and not self._closing:
                # Let a few records gather for one interval, unless enough arrive first.
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._interval)
            if not self.queue:
                if storing is not None and storing.done():
                    storing = None
                if self._closing:
                    # Every batch taken, also a slow write an overflow left behind.
                    await self._idle.wait()
                    return
                continue
            batch = [self.queue.popleft() for _ in range(min(self._batch_max, len(self.queue)))]
            self._queued_bytes -= sum(map(_captured_bytes, batch))
            if self._dropping:
                self._note_dropping()
            self._batches += 1
            self._idle.clear()
            try:
                rows = await self._encode(batch)
            except Exception:  # the writer must outlive any one bad batch
                log.exception("encoding a batch of %d records failed", len(batch))
                self.metrics.records["dropped"] += len(batch)
                self._batch_done()
                continue
            if self._stop_overdue() or (
                    storing is not None and not await self._previous_write_done(storing)):
                await self._spool_excess(rows)
                continue
            storing = spawn(self._store_batch(rows), name="recorder-store")

    async def _previous_write_done(self, storing: asyncio.Task[None]) -> bool:
        """Wait for the batch on its way to the database; False if the queue reaches the
        overflow mark first (the database is behind, and the batch at hand is excess), or a
        stop's grace for the queue runs out (the rest goes to the spool)."""
        while not storing.done():
            if self._behind() or self._stop_overdue():
                return False
            self._wake.clear()
            woken = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait((storing, woken), timeout=self._stop_left(),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                woken.cancel()
        return True

    async def _spool_excess(self, rows: tuple[list[Row], list[Row]]) -> None:
        """Append a batch the database has no room for now to the spool (a sequential write),
        rather than let the queue fill up and drop records; the write in flight goes on.

        While the database is up and only behind, the append does not wait for the disk
        (fsync): the spool then stands in for memory, and data written to the kernel
        outlives a crash of this process as the queue would not. Waiting for the disk would
        make the spool's throughput that of fsync: on a busy disk one fsync can take most of
        a second, long enough for the queue to reach its bound while the database is merely
        slow, and records would be dropped."""
        behind = self.database_ok  # (down, not behind, if not ok)
        if self._stop_overdue():
            if not self._stop_spooling:
                self._stop_spooling = True
                log.warning("the database did not take the queue within the stop's grace "
                            "(limits.shutdown_grace_s): spooling the %d records left, for "
                            "the next start to store", len(self.queue) + len(rows[0]))
        elif behind and not self.overflowing:
            self.overflowing = True
            log.warning("the database is behind (%d records queued): spooling the excess and "
                        "storing it as the database catches up", len(self.queue))
        try:
            # Also at a stop: the kernel keeps what was written after this process exits,
            # and an fsync per batch on a disk busy with the database's checkpoint could
            # hold the stop for seconds.
            await self._spool(*rows, durable=not behind)
        finally:
            self._batch_done()

    def _note_dropping(self) -> None:
        """Log a full queue once when the writer finds records dropped, and once more, with
        their count, when it has room again (not once per record: that is per request)."""
        if not self._dropping_told:
            self._dropping_told = True
            log.warning("the recorder's queue is full (recording.queue_max_records or "
                        "queue_max_bytes): records are dropped, and counted in "
                        "shadowproxy_records_total{outcome=\"dropped\"}, until the recorder "
                        "catches up with the traffic")
        if not self._behind():
            log.warning("the recorder's queue has room again; %d records were dropped while "
                        "it was full", self._dropping)
            self._dropping = 0
            self._dropping_told = False

    def _behind(self) -> bool:
        """True while the queue is past its overflow mark (in records or in bytes)."""
        return (len(self.queue) >= self._overflow_at
                or self._queued_bytes >= self._overflow_bytes)

    def _per_turn(self) -> int:
        """How many slices to encode, or frames to pickle, per turn of the loop: more while
        the writer is behind (``_CATCH_UP``)."""
        return _CATCH_UP if self._behind() else 1

    def _batch_done(self) -> None:
        self._batches -= 1
        if self._batches == 0:
            self._idle.set()

    async def _store_batch(self, rows: tuple[list[Row], list[Row]]) -> None:
        try:
            await self._store(*rows)
        except Exception as exc:  # the writer must outlive any one bad batch: keep it on disk
            log.exception("storing a batch of %d records failed; spooling it", len(rows[0]))
            # Route what follows through the spool too; the replayer brings it all back.
            self.database_ok = False
            self._note_problem(classify(exc))
            await self._spool(*rows)
        finally:
            self._batch_done()

    async def _encode(self, batch: list[Exchange]) -> tuple[list[Row], list[Row]]:
        """Rows for a batch, encoded in slices so that the data path gets the loop in
        between (one long encode would add its whole duration to some client's latency)."""
        requests: list[Row] = []
        responses: list[Row] = []
        start = 0
        while start < len(batch):
            end = start + _ENCODE_SLICE * self._per_turn()
            part = batch[start:end]
            start = end
            for encoder, run in self._by_rules(part):
                await encoder.streams.prepare(run)  # yields between streams
                if self.log_exchanges:
                    log_exchanges(run, encoder.query)
                req, resp = encoder.encode(run)
                requests += req
                responses += resp
                if encoder.withheld:
                    self._note_withheld(encoder.withheld)
                    encoder.withheld = []
            await asyncio.sleep(0)
        return requests, responses

    async def _write(self, requests: list[Row], responses: list[Row]) -> None:
        """One batch into the database (the caller holds ``_db_lock``), and what became of
        it counted: a record PostgreSQL refused even without its bodies is dropped, one
        the database held already (replayed again) was counted when it was stored."""
        writer = self.writer
        await writer.write(requests, responses)
        if writer.withheld:
            self._note_withheld(writer.withheld)
            writer.withheld = []
        lost = len(writer.unstorable)
        writer.unstorable = []
        self.metrics.records["written"] += len(requests) - lost - writer.already_stored
        self.metrics.records["dropped"] += lost

    def _note_problem(self, problem: ConnectionProblem | None, *,
                      starting: bool = False) -> None:
        """Remember why the database cannot be used, and log it when that changes: an outage
        once, a permanent problem with its cause and what to fix. No password is logged:
        the cause is the server's or the socket's message, the URL is never part of it."""
        old, self.problem = self.problem, problem
        if problem is not None and not problem.permanent and self._stop_overdue():
            # The stop's grace ran out and cut the write (a database silent, or only slow):
            # "not reachable" sent the operator looking for an outage of a database that
            # may be well, at every stop that left records to the next start.
            if not self._stop_cut_told:
                self._stop_cut_told = True
                log.warning("the stop's grace (limits.shutdown_grace_s) ran out while a batch "
                            "was on its way to the database (%s): the records it has not "
                            "taken wait in the spool in %s, and the next start stores them",
                            problem.cause, self.spool.directory)
            return
        if problem is None:
            if old is not None:
                log.info("database reachable again: writing to it directly, replaying the "
                         "spool")
            return
        if problem.permanent:
            if old is not None and old.permanent and old.cause == problem.cause:
                return
            log.error("the database refuses the proxy%s: %s. This is not an outage and will "
                      "not pass by itself: %s. Until then records go to the spool in %s "
                      "(nothing is lost while it has room, recording.spool_max_bytes), "
                      "/readyz answers 503, and the connection is tried again every %g s",
                      " at start-up" if starting else "", problem.cause, problem.fix,
                      self.spool.directory, _PERMANENT_RETRY_S)
        elif problem.locked:
            if old is not None and not old.permanent and old.locked:
                return
            # The database answers: "not reachable" sent the operator to the network.
            log.warning("the database holds the records back%s behind another session's lock "
                        "(%s); records go to the spool in %s and are stored when it is "
                        "released", " at start-up" if starting else "", problem.cause,
                        self.spool.directory)
        elif old is None or old.permanent or old.locked:
            log.warning("database not reachable%s (%s); records go to the spool in %s and are "
                        "stored when it is back", " at start-up" if starting else "",
                        problem.cause, self.spool.directory)

    def _note_withheld(self, notes: list[Withheld]) -> None:
        """Count the bodies withheld, and log them: which request, which body, why; never
        anything of the body itself."""
        for note in notes:
            self.metrics.withheld(note.reason)
            allowed, held_back = self._withheld_log.allow()
            if not allowed:
                continue
            body = ("request body" if note.where == "request"
                    else f"response body of {note.where!r}")
            log.warning("%s not stored: %s (%s); the row keeps its size, with body NULL and "
                        "body_truncated true%s", body, _WHY.get(note.reason, note.reason),
                        note.reason,
                        f"; {held_back} more such lines held back" if held_back else "",
                        extra={"request_id": note.request_id})

    async def _store(self, requests: list[Row], responses: list[Row]) -> None:
        if self.database_ok:
            async with self._db_lock:
                try:
                    await self._write(requests, responses)
                    return
                except DatabaseError as exc:
                    self.database_ok = False
                    self._note_problem(classify(exc))
        await self._spool(requests, responses)

    async def _spool(self, requests: list[Row], responses: list[Row], *,
                     durable: bool = True) -> None:
        """Append a batch to the spool, pickled here a frame at a time and written in a
        thread (the write and fsync must not hold up the data path), and make sure the
        replay task will bring it in. ``durable=False``: do not wait for the disk (see
        ``_spool_excess``)."""
        loop = asyncio.get_running_loop()
        try:
            framed = []
            for part in frames(requests, responses):
                framed.append(frame_bytes(part))
                if len(framed) % self._per_turn() == 0:
                    await asyncio.sleep(0)  # a small frame at a time (spool.py)
            async with self._spool_lock:
                stored = await loop.run_in_executor(None, self.spool.append_frames, framed,
                                                    durable)
                if stored:
                    self._start_replay()
            if not stored and not self.spool_full:
                # Once per episode, not once per batch: a full spool under load would
                # otherwise write hundreds of lines a second.
                log.warning("spool full (recording.spool_max_bytes): records are dropped, "
                            "and counted in shadowproxy_records_total{outcome=\"dropped\"}, "
                            "until the database takes the spooled ones")
        except SpoolError as exc:
            # Once per episode too: a full disk failed every batch, and its line each time
            # (hundreds a second under load) went to a log that may be on that same disk.
            if self._spool_failing is None:
                log.error("%s: records are dropped, and counted in "
                          "shadowproxy_records_total{outcome=\"dropped\"}, until it can be "
                          "written again", exc)
                self._spool_failing = 0
            self._spool_failing += len(requests)
            stored = False
        if stored and self._spool_failing is not None:
            log.info("the spool can be written again; %d records were dropped while it could "
                     "not", self._spool_failing)
            self._spool_failing = None
        elif stored and self.spool_full:
            log.info("the spool has room again")
        self.spool_full = not stored
        self.metrics.records["spooled" if stored else "dropped"] += len(requests)

    # --- replay ---
    async def _adopt(self) -> None:
        """Every ``ADOPT_EVERY_S``, adopt the segments of processes that have stopped, and
        have the replay store them (a directory listing, in a thread)."""
        loop = asyncio.get_running_loop()
        failed = False
        while True:
            await asyncio.sleep(ADOPT_EVERY_S)
            try:
                adopted = await loop.run_in_executor(None, self.spool.adopt_orphans)
            except OSError as exc:
                if not failed:
                    log.error("cannot take over the spool segments of stopped processes in "
                              "%s (%s); they are stored once it can", self.spool.directory, exc)
                failed = True
                continue
            failed = False
            if adopted:
                log.info("took over %d spool segments of processes that have stopped; they "
                         "are stored as the database takes them", adopted)
                async with self._spool_lock:  # (the replay decides it is done under it)
                    self._start_replay()

    def _start_replay(self) -> None:
        if not self._replaying:
            self._replaying = True
            self._replayed = [0, 0, 0]
            self._replay_task = spawn(self._replay(), name="recorder-replay")

    async def _replay(self) -> None:
        attempt = 0
        try:
            while not await self._replay_once():
                if self._stop_overdue():
                    # A stop's grace is spent: the next start stores the rest. Checked here
                    # and before each batch, not left to the cancellation alone, which a
                    # write finishing in the same turn can swallow (asyncio.wait_for of
                    # Python 3.11), and the replay would run on to the spool's end.
                    self._replaying = False
                    return
                if self.problem is not None and self.problem.permanent:
                    await asyncio.sleep(_PERMANENT_RETRY_S)
                else:
                    await asyncio.sleep(
                        _REPLAY_BACKOFF_S[min(attempt, len(_REPLAY_BACKOFF_S) - 1)])
                attempt += 1
        except BaseException:
            self._replaying = False  # cancelled at close, or a bug: the next append restarts it
            raise

    async def _replay_once(self) -> bool:
        """Move spooled batches into the database; True once the spool is empty, False when
        the database failed or a stop's grace ran out (what is left stays spooled)."""
        async with self._db_lock:
            problem = await self.writer.check()
        if problem is not None:
            self._note_problem(problem)
            return False
        if not self.database_ok:
            self.database_ok = True  # live batches go straight in again; the spool follows
        self._note_problem(None)
        try:
            while True:
                for segment in self._to_replay():
                    if not await self._replay_segment(segment):
                        return False
                async with self._spool_lock:
                    # Decided under the lock that appends take: a batch spooled after this
                    # point starts a new replay task.
                    if self.spool.active_bytes() == 0 and not self._to_replay():
                        self._replaying = False
                        self.overflowing = False
                        self.spool_full = False
                        segments, requests, answers = self._replayed
                        log.info("spool replayed: %d records and %d answers from %d "
                                 "segments stored", requests, answers, segments)
                        return True
                    self.spool.rotate()
        except DatabaseError as exc:
            self.database_ok = False
            self._note_problem(classify(exc))
            return False

    def _to_replay(self) -> list[Path]:
        return [s for s in self.spool.closed_segments() if s not in self._kept_back]

    async def _replay_segment(self, segment: Path) -> bool:
        """Store a segment's frames, gathered into batches of up to ``batch_max_records``
        requests (a COPY of a few frames costs the database less than one per frame), one
        frame read at a time between the data path's turns, then delete it; False (the
        segment kept whole, for the next start) once a stop's grace has run out. A frame
        that cannot be read back ends the segment: the frames before it are stored, and the
        rest is set aside and said in the log (it stopped the replay, or vanished unsaid)."""
        requests: list[Row] = []
        responses: list[Row] = []
        frames_read = 0
        unreadable: UnreadableFrame | None = None
        try:
            for offset, frame in self.spool.read_at(segment):
                try:
                    req, resp = frame_rows(frame)  # per frame: an old frame is a whole batch
                except Exception as exc:  # whatever another version's pickle holds
                    raise UnreadableFrame(str(exc), offset) from exc
                frames_read += 1
                requests += req
                responses += resp
                if len(requests) >= self._batch_max or len(responses) >= 2 * self._batch_max:
                    if not await self._replay_batch(requests, responses):
                        return False
                    self._count_replayed(requests, responses)
                    requests, responses = [], []
                await asyncio.sleep(0)
        except UnreadableFrame as exc:
            unreadable = exc
        if (requests or responses) and not await self._replay_batch(requests, responses):
            return False
        self._count_replayed(requests, responses)
        self._replayed[0] += 1
        if unreadable is not None:
            await self._set_aside(segment, unreadable, frames_read)
            return True
        # In a thread: freeing a segment's blocks can take the file system milliseconds.
        await asyncio.get_running_loop().run_in_executor(None, self.spool.remove, segment)
        return True

    def _count_replayed(self, requests: list[Row], responses: list[Row]) -> None:
        self._replayed[1] += len(requests)
        self._replayed[2] += len(responses)

    async def _set_aside(self, segment: Path, unreadable: UnreadableFrame,
                         frames_read: int) -> None:
        """Move the unreadable rest of a replayed segment out of the spool, and say so."""
        where = f"spool segment {segment}: {unreadable} at byte {unreadable.offset}"
        try:
            size = segment.stat().st_size
            kept, start = await asyncio.get_running_loop().run_in_executor(
                None, self.spool.set_aside, segment, unreadable.offset)
        except OSError as exc:
            # Left out of this process's replays (its frames are stored: they would only be
            # stored again, in a loop); the next start tries anew.
            self._kept_back.add(segment)
            log.error("%s; frames stored before it: %d; the segment could not be set aside "
                      "(%s): it stays, and is replayed again at the next start",
                      where, frames_read, exc)
            return
        rest = (f"the {size - start} bytes from there on are set aside in {kept}" if start
                else f"the segment is set aside whole in {kept}")
        log.warning("%s of %d; frames stored before it: %d; %s, not replayed: look at it, "
                    "then delete it", where, size, frames_read, rest)

    async def _replay_batch(self, requests: list[Row], responses: list[Row]) -> bool:
        """Store one batch of spooled rows; False (nothing written) once a stop's grace has
        run out. A segment replayed again after a stop mid-way skips what is stored."""
        await self._database_has_room()
        if self._stop_overdue():
            return False
        async with self._db_lock:
            await self._write(requests, responses)
        return True

    async def _database_has_room(self) -> None:
        """Wait while the live writes have a batch waiting: they go first, so that records
        are spooled only for what the database cannot take, not for the replay's sake."""
        while (self.database_ok and not self._closing
               and len(self.queue) >= self._write_after):
            await asyncio.sleep(self._interval)


_ARRIVAL_BYTES = 100
"""Memory of one noted arrival of a streamed answer's piece (a tuple of an int and a float)."""
_HEADER_BYTES = 124
"""Memory of one header (a tuple of two bytes objects, in a list) beyond what the head's
byte count gives it (its name's and value's bytes, and 4 for ": " and CRLF): a head of
``limits.max_header_bytes`` in the smallest headers a client can send holds ten times its
size in them."""


def _captured_bytes(exchange: Exchange) -> int:
    """The memory an exchange holds in its heads, bodies and streams' noted arrivals (what
    ``queue_max_bytes`` counts): a client's heads alone, without a body, can hold 600 KiB a
    record. A head's bytes were counted as it was parsed: no pass over its headers here."""
    size = len(exchange.body) + exchange.head_bytes + _HEADER_BYTES * len(exchange.headers)
    for response in exchange.responses:
        if response.body is not None:
            size += len(response.body)
        headers = response.headers
        if headers:
            size += response.head_bytes + _HEADER_BYTES * len(headers)
        if response.stream is not None:
            size += _ARRIVAL_BYTES * len(response.stream.arrivals)
    return size
