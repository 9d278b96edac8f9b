"""`shadowproxy demo`: the whole story end to end, and the process handling beneath it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import psutil
import pytest
import yaml

from shadowproxy.demo import DemoError, Processes, free_port, wait_http
from shadowproxy.store.embedded import start_embedded

ROOT = Path(__file__).resolve().parents[1]


def _demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SHADOWPROXY_DATABASE_URL"}
    return subprocess.run([sys.executable, "-m", "shadowproxy", "demo", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd="/")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def _recorded(url: str) -> dict[str, object]:
    conn = await asyncpg.connect(url)
    try:
        return {
            "requests": await conn.fetchval("SELECT count(*) FROM shadowproxy.requests"),
            "answered pairs": await conn.fetchval(
                "SELECT count(*) FROM shadowproxy.pairs WHERE shadow_status = 200"),
            "versions": {tuple(r) for r in await conn.fetch(
                "SELECT DISTINCT primary_body_json->>'model_version',"
                " shadow_body_json->>'model_version' FROM shadowproxy.pairs")},
            "labels": await conn.fetchval("SELECT count(*) FROM shadowproxy.labels"),
        }
    finally:
        await conn.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_demo_runs_the_whole_story_and_cleans_up(demo_dir: Path) -> None:
    """From any directory, the demo serves, records, reports, replays the traffic to a third
    model and prints both verdicts, stops everything and exits 0."""
    data_dir = demo_dir
    started = time.monotonic()
    proc = _demo("--requests", "150", "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.monotonic() - started < 120
    assert "Verdict" in proc.stdout  # the text report went to the terminal
    assert "150 answered 2xx" in proc.stdout
    # The third model got the recorded traffic by replay, and both verdicts are printed.
    assert "stored    150 answers as 'knn'" in proc.stdout
    assert re.search(r"candidate\s+live shadow\s+(PASS|WARN|FAIL)", proc.stdout)
    assert re.search(r"knn\s+replayed\s+(PASS|WARN|FAIL)", proc.stdout)
    html = (data_dir / "report.html").read_text()
    assert "<html" in html.lower() and "candidate" in html
    assert f"shadowproxy db-url -c {data_dir / 'shadowproxy.yaml'}" in proc.stdout

    # Nothing the demo started is left: not the models, not the proxy, not PostgreSQL.
    config = yaml.safe_load((data_dir / "shadowproxy.yaml").read_text())
    ports = [int(config[k].rsplit(":", 1)[1]) for k in ("listen", "admin_listen")]
    ports += [int(u.rsplit(":", 1)[1]) for u in
              [config["routes"][0]["primary"]["url"],
               *(s["url"] for s in config["routes"][0]["shadows"])]]
    assert not [p for p in ports if _listening(p)]
    leftovers = [p.info for p in psutil.process_iter(["pid", "cmdline"])
                 if str(data_dir) in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []

    # The records are there, paired, from two different models, with their labels.
    url = start_embedded(data_dir, cleanup="stop")
    try:
        assert asyncio.run(_recorded(url)) == {
            "requests": 150, "answered pairs": 300,
            "versions": {("linear-v1", "gbm-v2"), ("linear-v1", "knn-v3")}, "labels": 150}
    finally:
        _stop_embedded(data_dir)


def _stop_embedded(data_dir: Path) -> None:
    """Stop the server this test restarted, by the pid in its postmaster.pid."""
    pid = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGTERM)  # "smart" shutdown: the test's connections are closed
    deadline = time.monotonic() + 30
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie":
        assert time.monotonic() < deadline, "the embedded PostgreSQL did not stop"
        time.sleep(0.1)


def test_demo_refuses_a_bad_request_count(tmp_path: Path) -> None:
    """--requests 0 is a usage error (exit 2) before anything starts."""
    proc = _demo("--requests", "0", "--data-dir", str(tmp_path / "d"), timeout=30)
    assert proc.returncode == 2
    assert "--requests: expected 1 to" in proc.stderr
    assert not (tmp_path / "d").exists()


def test_demo_refuses_a_data_dir_it_cannot_create(tmp_path: Path) -> None:
    """A --data-dir under a regular file is a usage error naming the directory."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = _demo("--requests", "5", "--data-dir", str(blocker / "demo"), timeout=30)
    assert proc.returncode == 2
    assert f"--data-dir {blocker / 'demo'}: cannot create it" in proc.stderr


def _processes(tmp_path: Path) -> Processes:
    (tmp_path / "logs").mkdir()
    return Processes(tmp_path / "logs", dict(os.environ), tmp_path)


def test_a_child_that_dies_while_starting_fails_with_its_log(tmp_path: Path) -> None:
    """wait_http gives up as soon as the child exits, quoting the end of its log."""
    children = _processes(tmp_path)
    child = children.start("broken", [sys.executable, "-c",
                                      "import sys; print('no model file here'); sys.exit(3)"])
    try:
        with pytest.raises(DemoError, match=r"(?s)broken exited with status 3.*no model file"):
            wait_http(child, f"http://127.0.0.1:{free_port()}/healthz", timeout_s=30)
    finally:
        children.close()


def test_a_child_that_never_answers_times_out(tmp_path: Path) -> None:
    """A child that runs but never listens fails after the timeout, naming the URL."""
    children = _processes(tmp_path)
    child = children.start("silent", [sys.executable, "-c", "import time; time.sleep(60)"])
    port = free_port()
    try:
        with pytest.raises(DemoError, match=f"silent did not answer .*:{port}/healthz"):
            wait_http(child, f"http://127.0.0.1:{port}/healthz", timeout_s=0.5)
    finally:
        children.close()


def test_close_kills_what_ignores_sigterm_and_its_whole_group(tmp_path: Path) -> None:
    """close() kills a child that ignores SIGTERM, and the grandchildren in its group."""
    children = _processes(tmp_path)
    pid_file = tmp_path / "grandchild.pid"
    script = ("import signal, subprocess, sys, time\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(g.pid))\n"
              "time.sleep(60)\n")
    child = children.start("stubborn", [sys.executable, "-c", script])
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    assert children.close(timeout_s=0.5) == ["stubborn"]
    assert child.proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while psutil.pid_exists(grandchild) and psutil.Process(grandchild).status() != "zombie":
        assert time.monotonic() < deadline, "the grandchild outlived close()"
        time.sleep(0.05)
