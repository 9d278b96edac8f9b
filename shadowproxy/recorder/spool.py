"""Append-only spool files: where batches wait while PostgreSQL is unreachable.

Layout: ``data_dir/spool/seg-<pid>-<ns>.spool``, each a sequence of frames
``[length u32][crc32 u32][pickled (request rows, response rows)]``, fsynced per batch (but
for the excess of a database that is up and only behind, see ``Recorder._spool_excess``). A
batch is cut into frames of at most ``FRAME_REQUESTS`` requests, each with the answers to
its requests (``frames``): the recorder pickles them one at a time in the event loop and
the replay reads them back one at a time, so neither holds the data path for longer than
one small frame takes (a 1,000-record batch takes 5-8 ms to pickle, and pickling in a
thread does not help: ``pickle.dumps`` keeps the GIL for the whole call). A frame cut short
by a crash fails its length or CRC check (``UnreadableFrame``): the replay stores the frames
before it and sets the rest of the segment aside (``set_aside``, a ``.unreadable`` file the
replay never reads again, so that it cannot block the spool), and says so. Replay COPYs the
frames of a segment in batches like live ones, and a batch partly stored already goes through the
idempotent INSERT (the record id is the key); then the segment is deleted, so a replay
interrupted half-way and retried stores every record once.

Segments belong to the process that wrote them (pid in the name); at start-up, and every
``recorder.ADOPT_EVERY_S`` after, a process adopts the segments of processes that are gone,
such as one killed with ``kill -9``. A process holds ``owner-<pid>.lock`` in the spool
(``flock``) for as long as its spool is open, and the kernel lets go of it when the process
ends however it ends: a segment is adopted once its writer's lock can be taken. Whether a
process of that pid runs says nothing once pids are reused (a restarted container gives
them out again from the same small numbers): a segment whose pid now belonged to another
process, a supervisor or a database, was never adopted. Segments of a version before the
lock have no lock file, and are adopted once no process has their pid, as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pickle
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shadowproxy.errors import SpoolError, UnreadableFrame
from shadowproxy.private import open_private, private_directory

log = logging.getLogger("shadowproxy.recorder")

_FRAME = struct.Struct("<II")
SET_ASIDE_SUFFIX = ".unreadable"
"""What ``set_aside`` names the unreadable rest of a segment (not a ``.spool``: never replayed,
nor counted in the spool's size)."""
_SEGMENT_MAX_BYTES = 8 * 1024 * 1024  # rotated often, so that the replay can start on it
FRAME_REQUESTS = 64
"""Requests per spool frame: pickling 64 records of 1 kB bodies takes about 0.4 ms."""

Payload = tuple[list[Any], list[Any]]
"""A frame's content: (request rows, response rows)."""


def frames(requests: list[Any], responses: list[Any],
           per_frame: int = FRAME_REQUESTS) -> list[Payload]:
    """A batch cut into frames of at most ``per_frame`` requests, each with the answers to
    its requests (a response row's first field is its request's id, the same object as the
    request row's). An answer whose request is not in the batch (a replayed answer's)
    stays in the frame of the rows before it; a batch of answers alone is cut every
    ``2 * per_frame`` answers."""
    if not requests:
        step = 2 * per_frame
        return [([], responses[i:i + step]) for i in range(0, len(responses), step)] or [
            ([], [])]
    if len(requests) <= per_frame:
        return [(requests, responses)]
    count = (len(requests) + per_frame - 1) // per_frame
    answers: list[list[Any]] = [[] for _ in range(count)]
    # Keyed by identity: hashing a UUID runs Python code, hashing an int does not.
    frame_of = {id(row[0]): i // per_frame for i, row in enumerate(requests)}
    frame = 0
    for row in responses:
        frame = frame_of.get(id(row[0]), frame)
        answers[frame].append(row)
    return [(requests[i * per_frame:(i + 1) * per_frame], answers[i]) for i in range(count)]


def frame_bytes(payload: Payload) -> bytes:
    """One frame as written: its header (length, CRC-32) and the pickled payload."""
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(data), zlib.crc32(data)) + data


LOCK_PREFIX = "owner-"
LOCK_SUFFIX = ".lock"
_held: dict[Path, list[int]] = {}
"""This process's lock files, each [descriptor, spools open on it]: a second lock of the
same file by the same process (another ``Spool`` on the directory) would wait for the
first for good (``flock`` locks of two descriptors exclude each other)."""
_held_lock = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Spool:
    """This process's spool segments: append, rotate, read back, delete."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.pid = os.getpid()
        try:
            private_directory(directory)  # pickles: never another user's to write
        except OSError as exc:
            raise SpoolError(f"cannot create the spool directory {directory}: {exc}") from exc
        self._active: Path | None = None
        self._active_fd: int | None = None
        """The segment being appended to, written with ``os.write``: a buffered file kept
        what a failed write left over and wrote it at its next flush, after a torn frame."""
        self._active_size = 0
        """Bytes of whole frames in the segment being appended to."""
        self._locked = False
        try:
            self._own_lock()
        except OSError as exc:
            # (A file system without locks, no inode left.) The spool works all the same:
            # other processes tell this one's segments by its pid, as before the lock.
            log.error("cannot lock %s (%s): other processes on this data_dir tell whether "
                      "this one runs by its pid, and do not take over its spool segments "
                      "after it stops while another process has that pid",
                      self._lock_path(self.pid), exc)
        self.adopted_at_start = self.adopt_orphans()
        """Segments of stopped processes taken over as this spool opened."""

    def _lock_path(self, pid: int) -> Path:
        return self.directory / f"{LOCK_PREFIX}{pid}{LOCK_SUFFIX}"

    def _own_lock(self) -> None:
        """Lock this process's lock file, held until ``close`` or the process's end. Waits
        while an adopter holds it (the moment it takes to rename a dead process's segments,
        when this process got that pid again); the file an adopter removed meanwhile is
        made anew, so that the lock held is the one others find."""
        path = self._lock_path(self.pid)
        with _held_lock:
            if path in _held:
                _held[path][1] += 1
                self._locked = True
                return
            while True:
                fd = open_private(path, os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    if os.fstat(fd).st_ino == os.stat(path).st_ino:
                        _held[path] = [fd, 1]
                        self._locked = True
                        return
                except FileNotFoundError:
                    pass
                except BaseException:
                    os.close(fd)
                    # Not left unlocked: others would take this process's segments.
                    with contextlib.suppress(OSError):
                        path.unlink(missing_ok=True)
                    raise
                os.close(fd)

    def _release_lock(self) -> None:
        """Let go of this process's lock once no spool of it is open; its lock file goes
        too when no segment of it is left (else the adopter of the segments removes it)."""
        if not self._locked:
            return
        self._locked = False
        path = self._lock_path(self.pid)
        with _held_lock:
            held = _held[path]
            held[1] -= 1
            if held[1]:
                return
            del _held[path]
            with contextlib.suppress(OSError):
                if not self._segments(self.pid):
                    path.unlink(missing_ok=True)
            os.close(held[0])

    def _segments(self, pid: int | None = None) -> list[Path]:
        pattern = f"seg-{pid}-*.spool" if pid is not None else "seg-*.spool"
        return sorted(self.directory.glob(pattern))

    def adopt_orphans(self) -> int:
        """Take over the segments of processes that no longer run; return how many."""
        adopted = 0
        pids: set[int] = set()
        for path in self.directory.iterdir():
            name = path.name
            with contextlib.suppress(ValueError):
                if name.startswith("seg-") and name.endswith(".spool"):
                    pids.add(int(name.split("-")[1]))
                elif name.startswith(LOCK_PREFIX) and name.endswith(LOCK_SUFFIX):
                    pids.add(int(name[len(LOCK_PREFIX):-len(LOCK_SUFFIX)]))
        for pid in sorted(pids - {self.pid}):
            adopted += self._adopt_from(pid, adopted)
        return adopted

    def _adopt_from(self, pid: int, numbered: int) -> int:
        """Take over the segments of process ``pid`` if it has stopped; how many. Its lock
        file, taken, says it has; without one (a spool of an earlier version), that no
        process has its pid. The lock file goes with its last segment."""
        path = self._lock_path(pid)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            if _pid_alive(pid):
                return 0
            return self._rename_segments(pid, numbered)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # its writer runs
            except OSError:
                # A file system without locks (its writer could not lock it either).
                return 0 if _pid_alive(pid) else self._rename_segments(pid, numbered)
            try:
                if os.fstat(fd).st_ino != os.stat(path).st_ino:
                    return 0  # removed and made anew meanwhile: the next round looks again
            except FileNotFoundError:
                return 0
            adopted = self._rename_segments(pid, numbered)
            # Under the lock: a process that got this pid again makes a new file.
            path.unlink(missing_ok=True)
            return adopted
        finally:
            os.close(fd)

    def _rename_segments(self, pid: int, numbered: int) -> int:
        adopted = 0
        for seg in self._segments(pid):
            target = self.directory / f"seg-{self.pid}-{time.time_ns()}-{numbered + adopted}.spool"
            try:
                os.rename(seg, target)  # atomic: only one process can adopt a segment
                adopted += 1
            except FileNotFoundError:
                continue  # another process adopted it first
        return adopted

    def total_bytes(self) -> int:
        total = 0
        for seg in self._segments():
            with contextlib.suppress(FileNotFoundError):
                total += seg.stat().st_size
        return total

    def has_pending(self) -> bool:
        return bool(self._segments(self.pid))

    def append(self, payload: Payload, durable: bool = True) -> bool:
        """Write one batch as one frame (see ``append_frames``)."""
        return self.append_frames([frame_bytes(payload)], durable)

    def append_frames(self, framed: list[bytes], durable: bool = True) -> bool:
        """Write the frames of one batch (``frame_bytes``), and with ``durable`` wait until
        they are on disk (fsync); False (nothing written) when the spool is full. Without
        ``durable`` the batch is with the kernel, which keeps it across a crash of this
        process, not across a power cut; a later durable append to the same segment flushes
        it to disk too. Only system calls: run in a thread, it leaves the GIL to the loop.

        A write that fails (a full disk) raises SpoolError with nothing of the batch left in
        the segment: the reader stops at a torn frame, so the batches appended after one
        would be lost though they were written."""
        size = sum(map(len, framed))
        if self.total_bytes() + size > self.max_bytes:
            return False
        try:
            if self._active_fd is None or self._active_size > _SEGMENT_MAX_BYTES:
                self.rotate()
                self._active = self.directory / f"seg-{self.pid}-{time.time_ns()}.spool"
                self._active_fd = open_private(self._active, os.O_WRONLY | os.O_APPEND)
                self._active_size = 0
            for data in framed:
                _write_all(self._active_fd, data)
            if durable:
                os.fsync(self._active_fd)
        except OSError as exc:
            self._cut_back()
            raise SpoolError(f"cannot write to the spool {self.directory}: {exc}") from exc
        self._active_size += size
        return True

    def _cut_back(self) -> None:
        """After a failed append: the segment back to its whole frames, or, when even that
        fails, closed, so that its torn tail is its end and the next append starts a new
        one."""
        fd = self._active_fd
        if fd is None:
            self._active = None  # (creating it failed)
            return
        try:
            os.ftruncate(fd, self._active_size)
        except OSError:
            self.rotate()

    def active_bytes(self) -> int:
        """Bytes in the segment being appended to (0 when there is none)."""
        return self._active_size if self._active_fd is not None else 0

    def rotate(self) -> None:
        """Close the segment being appended to, so that it can be replayed."""
        fd = self._active_fd
        if fd is not None:
            self._active_fd = None
            self._active = None
            # Nothing is buffered here: a close that reports an error has closed the
            # descriptor all the same (Linux), and must not fail a stop or the replay.
            with contextlib.suppress(OSError):
                os.close(fd)

    def closed_segments(self) -> list[Path]:
        """This process's segments that are no longer appended to, oldest first."""
        return [s for s in self._segments(self.pid) if s != self._active]

    @staticmethod
    def read(segment: Path) -> Iterator[Any]:
        """The frames of a segment, read one at a time (a segment can hold 8 MiB);
        UnreadableFrame at the first that cannot be read back, after the whole ones before
        it (a torn write at a crash, garbage, a pickle this version cannot load). Each is
        what was pickled, a batch (``Payload``) unless another program or version wrote it:
        ``rows.frame_rows`` checks it. Typed as a batch, a frame of anything else failed the
        compiled build's type check where it was read, before that check could say what it
        held, and the replay with it."""
        for _, payload in Spool.read_at(segment):
            yield payload

    @staticmethod
    def read_at(segment: Path) -> Iterator[tuple[int, Any]]:
        """``read``, with each frame's offset in the segment."""
        try:
            file = open(segment, "rb")  # noqa: SIM115 (closed below, also when abandoned)
        except FileNotFoundError:
            return
        offset = 0
        with file:
            while True:
                head = file.read(_FRAME.size)
                if not head:
                    return
                if len(head) < _FRAME.size:
                    raise UnreadableFrame(f"a frame cut short ({len(head)} bytes of its "
                                          f"{_FRAME.size}-byte header: a write that a crash "
                                          "or a full disk ended)", offset)
                length, crc = _FRAME.unpack(head)
                chunk = file.read(length)
                if len(chunk) < length:
                    raise UnreadableFrame(f"a frame cut short ({len(chunk)} of its {length} "
                                          "bytes: a write that a crash or a full disk "
                                          "ended, or bytes added to the file)", offset)
                if zlib.crc32(chunk) != crc:
                    raise UnreadableFrame("a frame that fails its checksum (the file was "
                                          "altered or damaged on disk)", offset)
                try:
                    payload = pickle.loads(chunk)
                except Exception as exc:  # a pickle of another version: any error at all
                    raise UnreadableFrame(f"a frame that cannot be unpickled "
                                          f"({type(exc).__name__}: {exc}; written by another "
                                          "version?)", offset) from exc
                yield offset, payload
                offset += _FRAME.size + length

    @staticmethod
    def set_aside(segment: Path, offset: int) -> tuple[Path, int]:
        """Move the bytes of ``segment`` from ``offset`` on into a file of their own, beside
        it, that the replay never reads, and remove the segment (whose frames before
        ``offset`` the caller has stored); that file and the offset in the segment it
        starts at. Where the copy fails (a full disk) the whole segment is renamed instead,
        which needs no room (the offset is then 0). A crash half-way leaves the segment, to
        be replayed (its stored frames skipped) and set aside again. OSError if even the
        rename fails."""
        target = segment.with_name(segment.name.removesuffix(".spool") + SET_ASIDE_SUFFIX)
        if offset > 0:
            try:
                with open(segment, "rb") as src:
                    src.seek(offset)
                    fd = open_private(target, os.O_WRONLY | os.O_TRUNC)
                    try:
                        while chunk := src.read(1 << 20):
                            _write_all(fd, chunk)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            except OSError:
                target.unlink(missing_ok=True)
            else:
                segment.unlink(missing_ok=True)
                return target, offset
        os.replace(segment, target)
        return target, 0

    @staticmethod
    def remove(segment: Path) -> None:
        segment.unlink(missing_ok=True)

    def close(self) -> None:
        """Close the segment being appended to, and let go of this process's lock: a
        segment left is another process's to adopt from then on."""
        self.rotate()
        self._release_lock()


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` (a write to a filling disk can take part of it, then fail)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
