"""bench/unrecorded_tree.py's edit of the recorder still takes nothing, on the current code.

The benchmark's measure of what the recording costs (docs/performance.md) runs a tree whose
``Recorder.submit`` returns at once; the edit is anchored on the method's docstring, so a
change to the recorder that moves it must fail here, not in a benchmark later.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from shadowproxy.config import RecordingConfig
from shadowproxy.metrics import Metrics
from shadowproxy.recorder.recorder import Recorder
from tests.recorder.exchanges import exchange

ROOT = Path(__file__).resolve().parents[2]


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "unrecorded_tree", ROOT / "bench" / "unrecorded_tree.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _edited_recorder_module() -> ModuleType:
    source = (ROOT / "shadowproxy" / "recorder" / "recorder.py").read_text()
    edited = _tool().without_recording(source)
    module = ModuleType("unrecorded_recorder")
    sys.modules[module.__name__] = module  # (dataclasses look their module up)
    try:
        exec(compile(edited, "unrecorded_recorder.py", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module


def test_the_edited_recorder_queues_nothing_and_counts_each_exchange_dropped(
        tmp_path: Path) -> None:
    unused = "postgresql://127.0.0.1:9/none"  # the writer is never started
    edited = _edited_recorder_module().Recorder(
        RecordingConfig(), unused, tmp_path / "edited", Metrics())
    for i in range(3):
        edited.submit(exchange(i))
    assert len(edited.queue) == 0
    assert edited.metrics.records["dropped"] == 3
    # The product's recorder, for contrast, queues them.
    product = Recorder(RecordingConfig(), unused, tmp_path / "product", Metrics())
    for i in range(3):
        product.submit(exchange(i))
    assert len(product.queue) == 3
    assert product.metrics.records["dropped"] == 0


def test_a_recorder_without_the_anchor_is_refused_with_what_to_do() -> None:
    with pytest.raises(SystemExit, match="update ANCHOR"):
        _tool().without_recording("class Recorder:\n    def submit(self): pass\n")
