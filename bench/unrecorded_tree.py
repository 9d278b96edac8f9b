"""A compiled tree of shadowproxy that records nothing, to measure what the recording costs.

The same data path, with the recorder's ``submit`` counting each exchange as dropped and
returning: nothing is queued, encoded, written or spooled. It is a measuring instrument,
not a way to run the product, which records every answered request and has no switch to
stop. docs/performance.md ("What the recording costs") has the figures.

    python bench/unrecorded_tree.py /tmp/unrecorded
    BENCH_SCENARIOS=fast,echo5ms BENCH_CONNS=16,64 BENCH_TARGETS=direct,nginx-mirror \\
      bash bench/run.sh --reps 3 --proxy unrecorded="env SHADOWPROXY_BENCH_TREE=/tmp/unrecorded \\
      bash $PWD/bench/start_for_harness.sh {port} {primary_url} {shadow_url} {workdir}"

Name the target ``unrecorded``: bench/summarize.py then shows it beside the product's rows
and leaves it out of the record check (its exchanges are all counted as dropped).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORDER = Path("shadowproxy/recorder/recorder.py")
# The first line of Recorder.submit's body; what it returns is inserted after it.
ANCHOR = '        """Queue a finished exchange; never blocks, never raises."""\n'
TAKE_NOTHING = '        self.metrics.records["dropped"] += 1\n        return\n'


def without_recording(source: str) -> str:
    """recorder.py's source with ``Recorder.submit`` returning at once."""
    if source.count(ANCHOR) != 1:
        raise SystemExit(f"unrecorded_tree.py: Recorder.submit's docstring is not in "
                         f"{RECORDER} exactly once; update ANCHOR to the recorder's code")
    return source.replace(ANCHOR, ANCHOR + TAKE_NOTHING)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path, help="where the compiled tree goes (replaced)")
    parser.add_argument("--python", default=str(ROOT / ".venv/bin/python"),
                        help="the interpreter that compiles (needs mypy, setuptools>=77)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shadowproxy-unrecorded-") as scratch:
        copy = Path(scratch) / "tree"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
            ".git", ".venv*", "build", "*.so", "__pycache__", "results"))
        recorder = copy / RECORDER
        recorder.write_text(without_recording(recorder.read_text()))
        # compiled-tree.sh copies the tree it lives in: the patched copy's own.
        done = subprocess.run(["bash", str(copy / "tools/compiled-tree.sh"), str(args.dest),
                               args.python])
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
