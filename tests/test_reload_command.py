"""``shadowproxy reload -c FILE`` when there is nothing to reload: clear words and exit
statuses. (Reloading a running proxy through it is tested under load in test_live_load.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shadowproxy.cli import main
from shadowproxy.control import PROCESS_FILE, _data_dir

CONFIG = """\
data_dir: {data_dir}
routes:
  - name: r
    primary: {{url: "http://127.0.0.1:9001"}}
"""


def _write(tmp_path: Path, text: str | None = None) -> Path:
    path = tmp_path / "shadowproxy.yaml"
    path.write_text(text or CONFIG.format(data_dir=tmp_path / "data"))
    return path


def test_no_running_proxy_is_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    """With no proxy running for the file's data_dir, the command says where it looked."""
    path = _write(tmp_path)
    assert main(["reload", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert "no running shadowproxy found" in err
    assert str(tmp_path / "data" / "run" / PROCESS_FILE) in err


def test_a_dead_process_is_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A process file left by a proxy that is gone is not a running proxy."""
    path = _write(tmp_path)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    run = tmp_path / "data" / "run"
    run.mkdir(parents=True)
    (run / PROCESS_FILE).write_text(json.dumps({"pid": int(done.stdout), "config": str(path)}))
    assert main(["reload", "-c", str(path)]) == 1
    assert f"process {int(done.stdout)}" in capsys.readouterr().err


def test_an_invalid_file_with_nothing_running_is_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid file is reported as FILE:LINE: key.path: message, exit 2."""
    path = _write(tmp_path, CONFIG.format(data_dir=tmp_path / "data")
                  + "    shadows: [{name: s, url: ftp://x}]\n")
    assert main(["reload", "-c", str(path)]) == 2
    assert f"{path}:5: routes[0].shadows[0].url: expected an http://" in capsys.readouterr().err


def test_a_proxy_running_another_file_is_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The proxy found through data_dir runs another file: the command names it and sends
    nothing."""
    path = _write(tmp_path)
    run = tmp_path / "data" / "run"
    run.mkdir(parents=True)
    (run / PROCESS_FILE).write_text(json.dumps({"pid": os.getpid(),
                                                "config": "/etc/shadowproxy/other.yaml"}))
    assert main(["reload", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"runs /etc/shadowproxy/other.yaml, not {path}" in err


def test_data_dir_is_found_in_a_file_yaml_cannot_read(tmp_path: Path) -> None:
    """A file broken beyond YAML still names its data_dir on a line of its own, so that the
    running proxy can be asked (and report the error itself)."""
    path = _write(tmp_path, f"data_dir: '{tmp_path / 'd'}'  # spool\nroutes: [\n")
    data_dir, problems = _data_dir(path)
    assert data_dir == tmp_path / "d"
    assert problems and "(YAML)" in problems[0]


def test_data_dir_is_found_in_a_file_with_a_value_yaml_cannot_read(tmp_path: Path) -> None:
    """A file whose YAML parses but holds a value YAML cannot construct (a date that is
    none) still names its data_dir, and its problem is the file's, at its line."""
    path = _write(tmp_path, f"data_dir: '{tmp_path / 'd'}'\nwatch: 2026-02-30\n"
                            "routes: [{name: r, primary: {url: 'http://127.0.0.1:9001'}}]\n")
    data_dir, problems = _data_dir(path)
    assert data_dir == tmp_path / "d"
    assert problems == [f"{path}:2: watch: cannot read '2026-02-30' as a YAML timestamp "
                        "(day is out of range for month); quote it if it is text"]


def test_an_earlier_process_s_outcome_is_not_taken_for_an_answer(tmp_path: Path) -> None:
    """The last outcome written by another process (an earlier run) does not count as the
    running one's answer, whatever its sequence number."""
    from shadowproxy.control import OUTCOME_FILE, _seq

    run = tmp_path / "run"
    run.mkdir()
    (run / OUTCOME_FILE).write_text(json.dumps({"seq": 7, "pid": 1}))
    assert _seq(run, os.getpid()) == -1
    (run / OUTCOME_FILE).write_text(json.dumps({"seq": 7, "pid": os.getpid()}))
    assert _seq(run, os.getpid()) == 7


def test_a_worker_signalled_without_a_handed_on_configuration_keeps_running(
        tmp_path: Path) -> None:
    """A SIGHUP that reaches a worker without a configuration from its supervisor (a
    terminal's hangup reaches the whole process group) is nothing to apply."""
    from shadowproxy.config import load_config
    from shadowproxy.workers import _read_config

    assert _read_config(tmp_path, load_config(_write(tmp_path))) is None


@pytest.mark.parametrize(("timeout", "expected"), [
    ("0", "--timeout: expected a number of seconds above 0"),
    ("-1", "--timeout: expected a number of seconds above 0"),
    ("nan", "--timeout: expected a number of seconds above 0"),
    ("inf", "--timeout: expected a finite number of seconds (got inf): a proxy that never "
            "answers would be waited for ever"),
    ("1e400", "--timeout: expected a finite number of seconds (got inf)"),
])
def test_a_timeout_that_cannot_be_waited_is_refused_before_the_proxy_is_signalled(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], timeout: str,
        expected: str) -> None:
    """``--timeout`` of 0, below 0 or NaN is a usage error (exit 2) and no reload: the
    proxy was signalled and reloaded, and the command then said it did not answer (exit 1).
    One of infinity too: the command waited for ever for a proxy that did not answer."""
    import signal

    path = _write(tmp_path)
    run = tmp_path / "data" / "run"
    run.mkdir(parents=True)
    (run / PROCESS_FILE).write_text(json.dumps({"pid": os.getpid(), "config": str(path)}))
    hups: list[int] = []
    previous = signal.signal(signal.SIGHUP, lambda sig, _: hups.append(sig))
    try:
        assert main(["reload", "-c", str(path), "--timeout", timeout]) == 2
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert hups == []
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("process_file", ["missing", "of a process that is gone"])
def test_a_proxy_holding_its_data_dir_without_a_process_file_is_said_to_be_busy(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], process_file: str) -> None:
    """A proxy that is stopping has removed its process file, and one starting has not
    written it yet, while either holds the data_dir's claim: the command names that process
    and says it takes no reload now, not that no proxy runs."""
    path = _write(tmp_path)
    run = tmp_path / "data" / "run"
    run.mkdir(parents=True)
    if process_file != "missing":
        done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
        (run / PROCESS_FILE).write_text(json.dumps({"pid": int(done.stdout),
                                                    "config": str(path)}))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, pathlib; from shadowproxy.control import claim; "
         f"claim(pathlib.Path({str(run)!r})); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert main(["reload", "-c", str(path)]) == 1
    finally:
        holder.communicate("", timeout=10)
    err = capsys.readouterr().err
    assert f"shadowproxy (pid {holder.pid}) holds data_dir {tmp_path / 'data'} but takes no " \
           "reload now: it is stopping, or starting" in err
    # Once the claim is released, nothing runs.
    assert main(["reload", "-c", str(path)]) == 1
    assert "no running shadowproxy found" in capsys.readouterr().err
