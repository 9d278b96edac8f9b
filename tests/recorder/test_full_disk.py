"""A disk that fills up under the spool: the records that could not be written are dropped
and counted, every record counted as spooled is stored once the database is back, and a
stop at a full disk ends cleanly."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from shadowproxy.metrics import Metrics
from tests.recorder import full_disk
from tests.recorder.slow_database import stored
from tests.recorder.spool_replay import replay_spool

ROOT = Path(__file__).resolve().parents[2]


async def test_a_full_disk_drops_what_it_cannot_take_and_keeps_the_rest_replayable(
        database_url: str, tmp_path: Path) -> None:
    """Spooling through an outage onto a disk that fills, then has room, then is full
    again at the stop: the stop exits cleanly, spooled + dropped is every record, the
    failure is said once while the disk is full, and the next start stores exactly the
    spooled ones, each once."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.recorder.full_disk", str(tmp_path), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert b"Traceback" not in err, err.decode()[-3000:]
    outcomes = json.loads(out)
    # Said once for the time the disk was full, not once per batch it failed, and its end
    # with the records it cost.
    said = err.decode().count("cannot write to the spool")
    assert said == 1, err.decode()[-3000:]
    assert (f"the spool can be written again; {outcomes.get('dropped')} records were dropped "
            "while it could not") in err.decode(), err.decode()[-3000:]
    total = full_disk.BEFORE + full_disk.AFTER
    assert outcomes.get("dropped", 0) > 0  # the disk did fill up
    assert outcomes.get("spooled", 0) + outcomes["dropped"] == total

    later = Metrics()
    await replay_spool(database_url, tmp_path, full_disk.CONFIG, later)
    assert await stored(database_url) == (outcomes["spooled"], outcomes["spooled"])
    assert later.records["written"] == outcomes["spooled"]
