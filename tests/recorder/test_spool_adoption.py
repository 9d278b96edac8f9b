"""Spool segments of a process that stops while another runs on the same data_dir.

The workers of a supervisor that was killed drain their queues into the spool while the
next supervisor's workers start, and a ``shadowproxy replay`` leaves its own segments: a
running recorder takes them over within ``ADOPT_EVERY_S`` and stores them. They were
adopted at start-up only, and waited in the spool until the next restart.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from shadowproxy.config import RecordingConfig
from shadowproxy.metrics import Metrics
from shadowproxy.recorder import recorder as recorder_module
from shadowproxy.recorder.recorder import Recorder
from shadowproxy.recorder.rows import RowEncoder
from shadowproxy.recorder.spool import Spool, frame_bytes
from tests.recorder.exchanges import exchanges


async def test_the_segments_of_a_process_that_stops_later_are_stored(
        database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(recorder_module, "ADOPT_EVERY_S", 0.1, raising=False)
    caplog.set_level(logging.INFO, logger="shadowproxy.recorder")
    spool_dir = tmp_path / "spool"
    Spool(spool_dir, 1 << 20)  # (the directory, as a recorder makes it)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        segment = spool_dir / f"seg-{other.pid}-1.spool"
        segment.write_bytes(frame_bytes(RowEncoder(RecordingConfig()).encode(exchanges(5))))
        recorder = Recorder(RecordingConfig(), database_url, tmp_path, Metrics())
        await recorder.start()
        try:
            await asyncio.sleep(0.5)
            assert segment.exists()  # its process runs: not this recorder's to store
            other.kill()
            other.wait()
            for _ in range(100):
                if not list(spool_dir.glob("*.spool")):
                    break
                await asyncio.sleep(0.05)
        finally:
            await recorder.close()
    finally:
        other.kill()
        other.wait()
    assert not list(spool_dir.glob("*.spool")), "the segment was not taken over"
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM shadowproxy.requests") == 5
    finally:
        await conn.close()
    assert any("took over 1 spool segments of processes that have stopped" in r.getMessage()
               for r in caplog.records)


_WRITER = """
import sys, time
from pathlib import Path
from shadowproxy.recorder.spool import Spool
spool = Spool(Path(sys.argv[1]), 1 << 20)
spool.append_frames([Path(sys.argv[2]).read_bytes()])
print("written", flush=True)
time.sleep(60)
"""


def _writer(spool_dir: Path, frame: Path) -> subprocess.Popen[bytes]:
    """A process that spools one frame and runs on, its spool open, until killed."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(spool_dir), str(frame)],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with proc.stdout:
        assert proc.stdout.readline() == b"written\n"
    return proc


async def test_a_dead_writers_segment_is_stored_though_its_pid_runs_another_process(
        database_url: str, tmp_path: Path) -> None:
    """Pids are given out again (a restarted container starts from the same small numbers):
    the segment of a writer killed with ``kill -9`` is stored although another process has
    its pid now, and the segment of a writer that runs is left to it. Told by pid alone,
    the first waited in the spool for as long as that pid was taken."""
    spool_dir = tmp_path / "spool"
    frame = tmp_path / "frame"
    frame.write_bytes(frame_bytes(RowEncoder(RecordingConfig()).encode(exchanges(5))))
    running = _writer(spool_dir, frame)
    dead = _writer(spool_dir, frame)
    dead.kill()
    dead.wait()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # What the spool holds once ``other`` was given the dead writer's pid.
        for old in spool_dir.glob(f"*-{dead.pid}[-.]*"):
            old.rename(old.with_name(old.name.replace(f"-{dead.pid}", f"-{other.pid}", 1)))
        taken = list(spool_dir.glob(f"seg-{other.pid}-*.spool"))
        assert len(taken) == 1
        recorder = Recorder(RecordingConfig(), database_url, tmp_path, Metrics())
        await recorder.start()
        try:
            for _ in range(100):
                if not taken[0].exists():
                    break
                await asyncio.sleep(0.05)
            await recorder.drained()
            await asyncio.sleep(0.3)  # (the replay of what was taken over)
        finally:
            await recorder.close()
        assert not taken[0].exists(), "the dead writer's segment was not taken over"
        assert len(list(spool_dir.glob(f"seg-{running.pid}-*.spool"))) == 1
    finally:
        for proc in (other, running):
            proc.kill()
            proc.wait()
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM shadowproxy.requests") == 5
    finally:
        await conn.close()


def test_a_spool_whose_lock_cannot_be_taken_works_and_is_told_by_its_pid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """On a file system without locks (``flock`` fails with ENOLCK) the spool opens, says
    so, and leaves no lock file behind that another process could take for its own: its
    segments are told by its pid, as before the lock."""
    import errno
    import fcntl
    import os

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    spool_dir = tmp_path / "spool"
    with monkeypatch.context() as patched:
        patched.setattr(fcntl, "flock", no_locks)
        spool = Spool(spool_dir, 1 << 20)
        assert spool.append(([], []))
        assert not list(spool_dir.glob("owner-*"))
        assert Spool(spool_dir, 1 << 20).adopt_orphans() == 0  # (this process runs)
    assert any("cannot lock" in r.getMessage() for r in caplog.records)
    assert len(list(spool_dir.glob(f"seg-{os.getpid()}-*.spool"))) == 1
    spool.close()


async def test_the_start_says_what_it_took_over_and_the_replay_what_it_stored(
        database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The segments of a stopped process taken over at start-up are said, with their
    number, and the replay says how many records and answers it stored from how many
    segments. Both were silent at start-up but for a bare "spool replayed"."""
    caplog.set_level(logging.INFO, logger="shadowproxy.recorder")
    spool_dir = tmp_path / "spool"
    frame = tmp_path / "frame"
    frame.write_bytes(frame_bytes(RowEncoder(RecordingConfig()).encode(exchanges(3))))
    for _ in range(2):
        dead = _writer(spool_dir, frame)
        dead.kill()
        dead.wait()
    recorder = Recorder(RecordingConfig(), database_url, tmp_path, Metrics())
    await recorder.start()
    try:
        for _ in range(100):
            if any(r.getMessage().startswith("spool replayed") for r in caplog.records):
                break
            await asyncio.sleep(0.05)
    finally:
        await recorder.close()
    messages = [r.getMessage() for r in caplog.records]
    assert "took over 2 spool segments of processes that have stopped; they are stored as " \
           "the database takes them" in messages
    assert "spool replayed: 6 records and 6 answers from 2 segments stored" in messages
