"""A spooled batch is written as small frames, each with the answers to its requests, and
replayed whole: every record once, in batches, whatever the frames' number."""

from __future__ import annotations

from pathlib import Path

from shadowproxy.config import RecordingConfig
from shadowproxy.metrics import Metrics
from shadowproxy.models import CapturedResponse, Exchange
from shadowproxy.recorder.recorder import Recorder
from shadowproxy.recorder.rows import RowEncoder
from shadowproxy.recorder.spool import FRAME_REQUESTS, Spool, frame_bytes, frames
from tests.recorder.exchanges import exchange
from tests.recorder.slow_database import stored
from tests.recorder.spool_replay import replay_spool

UNREACHABLE = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"


def two_answers(i: int) -> Exchange:
    ex = exchange(i)
    shadow = CapturedResponse("shadow", "shadow", ex.received_at)
    shadow.status, shadow.headers, shadow.body = 200, [], b'{"prediction": 2}'
    ex.responses.append(shadow)
    return ex


def test_a_batch_is_cut_into_frames_that_keep_each_answer_with_its_request() -> None:
    requests, responses = RowEncoder(RecordingConfig()).encode(
        [two_answers(i) for i in range(150)])
    parts = frames(requests, responses, per_frame=64)
    assert [len(req) for req, _ in parts] == [64, 64, 22]
    for req, resp in parts:
        ids = {row[0] for row in req}
        assert len(resp) == 2 * len(req)
        assert {row[0] for row in resp} == ids
    assert [row for req, _ in parts for row in req] == requests
    assert [row for _, resp in parts for row in resp] == responses


def test_answers_without_their_request_stay_with_their_neighbours() -> None:
    requests, responses = RowEncoder(RecordingConfig()).encode(
        [two_answers(i) for i in range(100)])
    # A replayed answer (its request stored already) between the rows of the batch.
    replayed = two_answers(1000)
    replayed.request_stored = True
    _, alone = RowEncoder(RecordingConfig()).encode([replayed])
    at = 2 * 70  # after the answers of request 69, in the second frame
    mixed = responses[:at] + alone + responses[at:]
    parts = frames(requests, mixed, per_frame=64)
    assert [len(req) for req, _ in parts] == [64, 36]
    assert all(row in parts[1][1] for row in alone)
    assert sum(len(resp) for _, resp in parts) == len(mixed)
    # A batch of answers alone is cut too.
    only = frames([], mixed, per_frame=64)
    assert [len(resp) for _, resp in only] == [128, 74]
    assert frames([], [], per_frame=64) == [([], [])]


def test_a_frame_survives_its_round_trip_through_a_segment(tmp_path: Path) -> None:
    requests, responses = RowEncoder(RecordingConfig()).encode(
        [two_answers(i) for i in range(100)])
    spool = Spool(tmp_path, max_bytes=10 * 1024 * 1024)
    assert spool.append_frames([frame_bytes(p) for p in frames(requests, responses)])
    spool.rotate()
    (segment,) = spool.closed_segments()
    back = list(Spool.read(segment))
    assert len(back) == 2
    assert [row for req, _ in back for row in req] == requests
    assert [row for _, resp in back for row in resp] == responses
    # The answers still share their request's id object, as the encoder made them: pickle
    # keeps shared references within a frame.
    req, resp = back[0]
    assert resp[0][0] is req[0][0]
    # A full spool takes nothing.
    small = Spool(tmp_path / "small", max_bytes=1000)
    assert not small.append_frames([frame_bytes(back[0])])
    assert small.total_bytes() == 0


async def test_a_spooled_batch_is_written_in_frames_and_replayed_once(
        database_url: str, tmp_path: Path) -> None:
    """Batches spooled during an outage are appended as frames of at most FRAME_REQUESTS
    requests; the next recorder on the same data_dir stores every record exactly once."""
    metrics = Metrics()
    config = RecordingConfig(batch_max_records=1000, write_after_records=1000,
                             flush_interval_ms=50)
    total = 1500
    recorder = Recorder(config, UNREACHABLE, tmp_path, metrics)
    await recorder.start()
    try:
        for i in range(total):
            recorder.submit(two_answers(i))
        await recorder.drained()
    finally:
        await recorder.close()
    assert metrics.records["spooled"] == total
    segments = sorted((tmp_path / "spool").glob("*.spool"))
    assert segments
    sizes = []
    for segment in segments:
        for req, resp in Spool.read(segment):
            sizes.append(len(req))
            assert len(resp) == 2 * len(req)
    assert sum(sizes) == total
    assert max(sizes) == FRAME_REQUESTS
    assert len(sizes) >= total // FRAME_REQUESTS

    # The next recorder on this data_dir (as after a restart) stores them.
    later = Metrics()
    await replay_spool(database_url, tmp_path, config, later)
    assert later.records["written"] == total
    assert await stored(database_url) == (total, 2 * total)


async def test_records_replayed_again_are_counted_written_once(
        database_url: str, tmp_path: Path) -> None:
    """A segment replayed again (a stop came between its COPY and its deletion) is skipped
    where the database holds its records, and they do not count as written again; the new
    records replayed with it do."""
    config = RecordingConfig(batch_max_records=1000, write_after_records=1000,
                             flush_interval_ms=50)

    async def outage(first: int, count: int) -> None:
        recorder = Recorder(config, UNREACHABLE, tmp_path, Metrics())
        await recorder.start()
        try:
            for i in range(first, first + count):
                recorder.submit(two_answers(i))
            await recorder.drained()
        finally:
            await recorder.close()

    await outage(0, 300)
    spool = tmp_path / "spool"
    kept = {segment.name: segment.read_bytes() for segment in spool.glob("*.spool")}
    assert kept
    metrics = Metrics()
    await replay_spool(database_url, tmp_path, config, metrics)
    assert metrics.records["written"] == 300

    # The stored segments come back, beside a spool of 200 new records.
    await outage(300, 200)
    for name, data in kept.items():
        assert not (spool / name).exists()
        (spool / name).write_bytes(data)
    again = Metrics()
    await replay_spool(database_url, tmp_path, config, again)
    assert again.records["written"] == 200
    assert await stored(database_url) == (500, 1000)
