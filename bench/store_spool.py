"""Store what the benchmark's proxies left in their spools, and what storing it cost.

    python bench/store_spool.py DATA_ROOT DATABASE_URL [--seconds N] [--json FILE]

``bench/start_for_harness.sh`` gives every start of a proxy a data folder of its own under
DATA_ROOT (``run-<start time in ns>-<pid>``), so that no run replays another run's spool in
its measured window and is charged for it. A proxy stopped while PostgreSQL is behind
spools the excess and stores what it can within ``limits.shutdown_grace_s``; what is left
waits in its folder's ``spool``. ``bench/run.sh`` calls this once the benchmark is done: the
product's own recorder, started on each folder in turn, replays its spool into the database
as a proxy's next start would, and stops once it is empty (or after ``--seconds``).

Prints one line: the records stored, the CPU time that took (this process's, per record),
and whether every spool is empty. ``--json FILE`` writes each folder's figures (start time,
records stored, CPU seconds), which ``bench/summarize.py`` charges to the run the folder
belongs to. A DATA_ROOT that itself holds a ``spool`` (one shared folder) is stored as one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
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


def folders(root: Path) -> list[Path]:
    """The data folders under ``root`` that hold a spool, oldest start first."""
    if (root / "spool").is_dir():
        return [root]
    return sorted((p for p in root.glob("run-*") if (p / "spool").is_dir()),
                  key=started_ns)


def started_ns(folder: Path) -> int:
    """The start time in the name of a folder ``run-<ns>-<pid>`` (0 for any other)."""
    parts = folder.name.split("-")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_root", type=Path)
    parser.add_argument("database_url")
    parser.add_argument("--seconds", type=float, default=300.0,
                        help="give up on a folder after this long (what is left stays spooled)")
    parser.add_argument("--json", type=Path, help="write each folder's figures here")
    args = parser.parse_args()
    found = folders(args.data_root) if args.data_root.is_dir() else []
    figures = []
    written_all, cpu_all, empty_all = 0, 0.0, True
    for folder in found:
        cpu = time.process_time()
        written, empty = asyncio.run(store(folder, args.database_url, args.seconds))
        cpu = time.process_time() - cpu
        figures.append({"folder": folder.name, "started_ns": started_ns(folder),
                        "stored": written, "cpu_s": cpu, "empty": empty})
        written_all += written
        cpu_all += cpu
        empty_all = empty_all and empty
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1))
    if not found:
        print("store_spool: no spool, nothing to store")
        return
    per_record = f", {1e6 * cpu_all / written_all:.0f} µs per record" if written_all else ""
    print(f"store_spool: {written_all:,} spooled records stored from {len(found)} data "
          f"folders in {cpu_all:.1f} s of CPU{per_record}; "
          f"{'spool empty' if empty_all else 'records still spooled (see the proxy log)'}")


if __name__ == "__main__":
    main()
