"""A spool segment with a frame that cannot be read back: cut short by a crash (``kill -9``
in the middle of an append), damaged, with bytes added, or not in this version's layout.

The replay stores every whole frame before it exactly once, sets the rest of the segment
aside in a ``.unreadable`` file beside it (never replayed, so it cannot block the spool),
says so in the log, and goes on with the other segments. Before, a torn or damaged frame
ended the segment in silence (what followed it deleted with it), and a frame that unpickled
to something else than a batch made the replay task fail at every attempt and the stop
raise.
"""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg
import pytest

from shadowproxy.config import RecordingConfig
from shadowproxy.metrics import Metrics
from shadowproxy.recorder.rows import RowEncoder
from shadowproxy.recorder.spool import Spool, frame_bytes
from tests.recorder.exchanges import exchange
from tests.recorder.spool_replay import replay_spool

PER_FRAME = 4
"""Records per frame of the segments written here (three frames a segment)."""


def _segment(spool_dir: Path, first: int, frames: int = 3) -> tuple[Path, list[int]]:
    """A closed segment of ``frames`` frames of records numbered from ``first``; the path
    and the offset each frame starts at."""
    spool = Spool(spool_dir, 1 << 24)
    before = set(spool.closed_segments())
    encoder = RowEncoder(RecordingConfig())
    offsets = []
    for f in range(frames):
        offsets.append(spool.active_bytes())
        batch = [exchange(first + f * PER_FRAME + i) for i in range(PER_FRAME)]
        assert spool.append(encoder.encode(batch))
    spool.close()
    (segment,) = set(spool.closed_segments()) - before
    return segment, offsets


async def _stored(database_url: str) -> list[int]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT (body_json->>'i')::int AS i FROM shadowproxy.requests "
                                "ORDER BY i")
    finally:
        await conn.close()
    return [r["i"] for r in rows]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "shadowproxy.recorder" and r.levelno >= logging.WARNING]


# Each damage: (what is done to the segment's bytes given its frames' offsets, the number
# of whole frames before the first unreadable one, the reason the log gives)
DAMAGE = {
    "cut in the last frame's body": (lambda b, o: b[:-7], 2, "cut short"),
    "cut in the last frame's header": (lambda b, o: b[:o[2] + 5], 2, "cut short"),
    "cut in the first frame": (lambda b, o: b[:100], 0, "cut short"),
    "garbage appended": (lambda b, o: b + b"\x00garbage" * 50, 3, "cut short"),
    "a byte flipped in the middle frame": (
        lambda b, o: b[:o[1] + 20] + bytes([b[o[1] + 20] ^ 0xFF]) + b[o[1] + 21:], 1,
        "fails its checksum"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
async def test_the_whole_frames_before_an_unreadable_one_are_stored_and_the_rest_set_aside(
        database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        damage: str) -> None:
    change, whole, reason = DAMAGE[damage]
    spool_dir = tmp_path / "spool"
    segment, offsets = _segment(spool_dir, 0)
    data = segment.read_bytes()
    damaged = change(data, offsets)
    segment.write_bytes(damaged)
    cut_at = offsets[whole] if whole < len(offsets) else len(data)
    later, _ = _segment(spool_dir, 100)  # another segment, replayed after this one

    caplog.set_level(logging.INFO, logger="shadowproxy.recorder")
    metrics = Metrics()
    await replay_spool(database_url, tmp_path, RecordingConfig(), metrics)

    assert await _stored(database_url) == [
        *range(whole * PER_FRAME), *range(100, 100 + 3 * PER_FRAME)]
    assert metrics.records["written"] == (whole + 3) * PER_FRAME
    (aside,) = spool_dir.glob("*.unreadable")
    assert aside.read_bytes() == damaged[cut_at:]
    (line,) = _warnings(caplog)
    assert (f"spool segment {segment}: " in line and reason in line
            and f"at byte {cut_at} of {len(damaged)}; frames stored before it: {whole}; "
            in line and f"set aside {'' if cut_at else 'whole '}in {aside}" in line), line
    assert not later.exists() and not list(spool_dir.glob("*.spool"))


async def test_a_frame_that_is_not_a_batch_does_not_stop_the_replay(
        database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A frame whose checksum holds but whose pickle is not a batch of rows of this
    version's layout (another program's, a newer version's with a column more) is set
    aside with what follows it; the frames before it, and the other segments, are stored."""
    spool_dir = tmp_path / "spool"
    odd, _ = _segment(spool_dir, 0, frames=2)
    whole = odd.stat().st_size
    with open(odd, "ab") as f:
        f.write(frame_bytes({"not": "a batch"}))  # type: ignore[arg-type]
    requests, responses = RowEncoder(RecordingConfig()).encode([exchange(50)])
    newer = spool_dir / "seg-999999999-1.spool"  # (a process that is gone)
    newer.write_bytes(frame_bytes(([(*r, "a newer column") for r in requests], responses)))
    _segment(spool_dir, 100)

    caplog.set_level(logging.INFO, logger="shadowproxy.recorder")
    await replay_spool(database_url, tmp_path, RecordingConfig(), Metrics())

    assert await _stored(database_url) == [*range(2 * PER_FRAME), *range(100, 112)]
    assert len(list(spool_dir.glob("*.unreadable"))) == 2
    lines = _warnings(caplog)
    assert any(f"a frame that holds a dict, not a batch of rows at byte {whole} of " in line
               for line in lines), lines
    assert any("request rows of 15 columns where this version has 14 (written by a newer "
               "version of shadowproxy" in line and "set aside whole" in line
               for line in lines), lines


async def test_an_empty_segment_is_removed_without_a_word(
        database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A segment created and never written to (a process killed right after opening it)
    holds nothing to store or set aside."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o700)
    (spool_dir / "seg-999999999-1.spool").write_bytes(b"")
    caplog.set_level(logging.INFO, logger="shadowproxy.recorder")
    await replay_spool(database_url, tmp_path, RecordingConfig(), Metrics())
    assert not list(spool_dir.iterdir())
    assert not _warnings(caplog)


async def test_a_segment_that_cannot_be_set_aside_is_left_and_does_not_hold_the_replay(
        database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Where neither the rest nor the whole segment can be moved aside (here a directory
    in the way of the file), the segment stays for the next start, said as an error; the
    replay stores it once and goes on, not round in a loop."""
    spool_dir = tmp_path / "spool"
    segment, _ = _segment(spool_dir, 0)
    segment.write_bytes(segment.read_bytes()[:-7])
    (spool_dir / segment.name.replace(".spool", ".unreadable")).mkdir()
    (spool_dir / segment.name.replace(".spool", ".unreadable") / "x").touch()
    later, _ = _segment(spool_dir, 100)

    caplog.set_level(logging.INFO, logger="shadowproxy.recorder")
    metrics = Metrics()
    with pytest.raises(AssertionError, match="the spool was not replayed"):
        await replay_spool(database_url, tmp_path, RecordingConfig(), metrics, within_s=2)
    assert await _stored(database_url) == [*range(2 * PER_FRAME), *range(100, 112)]
    assert metrics.records["written"] == 5 * PER_FRAME
    assert segment.exists() and not later.exists()
    (line,) = _warnings(caplog)
    assert "frames stored before it: 2; the segment could not be set aside" in line, line
