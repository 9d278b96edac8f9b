"""`shadowproxy run` on a data_dir whose disk is full: it serves, says what it cannot write,
and stops cleanly. The full disk is a file-size limit of 0 (RLIMIT_FSIZE), which the kernel
enforces on every write to a file as it would a full disk (EFBIG instead of ENOSPC)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sys
from pathlib import Path

import aiohttp

from tests.test_run_command import wait_ready, write_config
from tests.upstreams import model, serve


def _full_disk() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit: EFBIG, not a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


async def test_a_full_disk_at_the_start_is_said_and_the_proxy_serves(
        tmp_path: Path, database_url: str) -> None:
    """The data_dir's lock takes no pid and the process file cannot be written: the start
    says so (`shadowproxy reload` will not find the proxy) and serves. It ended with a
    traceback at the lock's pid."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow:
        config, port, admin = write_config(tmp_path, primary.url, shadow.url, database_url)
        # (The log to a pipe: the limit holds for every file the process writes.)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shadowproxy", "run", "-c", str(config),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            preexec_fn=_full_disk, env={**os.environ, "SHADOWPROXY_DATABASE_URL": ""})
        try:
            await wait_ready(admin, proc)
            async with aiohttp.ClientSession() as http:
                resp = await http.post(f"http://127.0.0.1:{port}/p", json={"features": {}})
                assert resp.status == 200
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
    said, status = err.decode(), proc.returncode
    assert status == 0, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    run_dir = tmp_path / "data" / "run"
    assert (f"cannot write {run_dir / 'shadowproxy.json'} (File too large): `shadowproxy "
            f"reload -c {config}` will not find this process") in said, said[-3000:]
    assert sorted(p.name for p in run_dir.iterdir()) == ["lock"]  # no half-written file


async def test_workers_on_a_full_disk_serve_and_stop_cleanly(
        tmp_path: Path, database_url: str) -> None:
    """With `workers: 2`, a worker that cannot write its final snapshot at the stop says
    so and exits 0, leaving no half-written file. It failed with a traceback (and a
    second one for the file that was to say why), and the supervisor reported both
    workers as failed, exit status 1."""
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow:
        config, port, _ = write_config(tmp_path, primary.url, shadow.url, database_url,
                                       workers=2)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shadowproxy", "run", "-c", str(config),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            preexec_fn=_full_disk, env={**os.environ, "SHADOWPROXY_DATABASE_URL": ""})
        early: list[bytes] = []
        try:
            # Both workers listening before the stop: one still starting exits without
            # serving, and has no final snapshot to write. (Not /readyz: a worker that
            # cannot publish its snapshot is not ready, docs/operations.md.)
            assert proc.stderr is not None
            while sum(b" listening on " in line for line in early) < 2:
                line = await asyncio.wait_for(proc.stderr.readline(), 60)
                assert line, b"".join(early).decode()[-3000:]
                early.append(line)
            async with aiohttp.ClientSession() as http:
                for _ in range(300):
                    with contextlib.suppress(aiohttp.ClientError):
                        resp = await http.post(f"http://127.0.0.1:{port}/p",
                                               json={"features": {}})
                        if resp.status == 200:
                            break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("the workers did not serve")
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
    said = b"".join(early).decode() + err.decode()
    assert proc.returncode == 0, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    assert said.count("cannot write this worker's final snapshot") == 2, said[-3000:]
    assert sorted(p.name for p in (tmp_path / "data" / "run").iterdir()) == ["lock"]
