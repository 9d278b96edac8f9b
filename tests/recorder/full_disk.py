"""A recorder spooling through an outage onto a disk that fills up and then has room again,
run as its own process (``python -m tests.recorder.full_disk DATA_DIR``): the disk is a
file-size limit (RLIMIT_FSIZE), which the kernel enforces on the spool's writes as it would
a full disk (EFBIG instead of ENOSPC). Prints the records' outcomes as JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import signal
import sys
from pathlib import Path

from shadowproxy.config import RecordingConfig
from shadowproxy.metrics import Metrics
from shadowproxy.models import Exchange
from shadowproxy.recorder.recorder import Recorder
from tests.recorder.exchanges import exchange

UNREACHABLE = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"
CONFIG = RecordingConfig(write_after_records=10, flush_interval_ms=20)
DISK_BYTES = 20_000
"""Room on the "disk": a few batches of ten 1 kB records fit, the next one is cut."""
BEFORE, AFTER = 100, 30
"""Records submitted while the disk fills, and after it has room again."""


def record(i: int) -> Exchange:
    ex = exchange(i)
    ex.body = b'{"v": "' + b"x" * 991 + b'"}'
    ex.body_size = len(ex.body)
    return ex


async def main(data_dir: Path) -> None:
    metrics = Metrics()
    recorder = Recorder(CONFIG, UNREACHABLE, data_dir, metrics)
    await recorder.start()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_BYTES, hard))
    try:
        for i in range(BEFORE):
            recorder.submit(record(i))
            if i % 10 == 9:
                await recorder.drained()
        # Room again (a stop at a full disk is the same: the stop must not fail either).
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        for i in range(BEFORE, BEFORE + AFTER):
            recorder.submit(record(i))
            if i % 10 == 9:
                await recorder.drained()
        resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_BYTES, hard))
    finally:
        await recorder.close()
    print(json.dumps(dict(metrics.records)))


if __name__ == "__main__":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit: EFBIG, not a signal
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    asyncio.run(main(Path(sys.argv[1])))
