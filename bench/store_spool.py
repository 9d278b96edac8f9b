"""Store what the benchmark's proxies left in their spool, so that the record check is exact.

    python bench/store_spool.py DATA_DIR DATABASE_URL [--seconds N]

A proxy stopped while PostgreSQL is behind spools the excess and stores what it can within
``limits.shutdown_grace_s``; the rest waits in ``DATA_DIR/spool`` for the next start on
that folder. After the last run of a benchmark there is no next start, so ``bench/run.sh``
calls this: the product's own recorder, started on the folder, replays the spool into the
database as a proxy's start would, and stops once it is empty (or after ``--seconds``).
Prints one line: the records stored and whether the spool is empty.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from shadowproxy.config import RecordingConfig
from shadowproxy.metrics import Metrics
from shadowproxy.recorder.recorder import Recorder


async def store(data_dir: Path, url: str, seconds: float) -> tuple[int, bool]:
    metrics = Metrics()
    recorder = Recorder(RecordingConfig(), url, data_dir, metrics, stop_grace_s=seconds)
    await recorder.start()
    await recorder.close()  # waits up to stop_grace_s for the replay to finish
    return metrics.records["written"], not recorder.spool.has_pending()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("database_url")
    parser.add_argument("--seconds", type=float, default=300.0,
                        help="give up after this long (what is left stays spooled)")
    args = parser.parse_args()
    if not (args.data_dir / "spool").is_dir():
        print("store_spool: no spool, nothing to store")
        return
    written, empty = asyncio.run(store(args.data_dir, args.database_url, args.seconds))
    print(f"store_spool: {written:,} spooled records stored; "
          f"{'spool empty' if empty else 'records still spooled (see the proxy log)'}")


if __name__ == "__main__":
    main()
