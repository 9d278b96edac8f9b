"""``shadowproxy demo``: the whole story on one machine, with nothing but Python.

It starts the embedded PostgreSQL under ``--data-dir``, the two example model services of
``examples/`` (a ridge regression as the primary, gradient boosting as the candidate shadow,
both trained at start on scikit-learn's bundled diabetes data), and ``shadowproxy run`` in
front of them; sends ``--requests`` requests through the proxy with a progress bar; waits
until every exchange is in the database; loads the true outcomes as labels; prints the
comparison report and writes its HTML version; then starts a third model that did not exist
when the traffic came in (k-nearest neighbours), replays the recorded traffic to it with
``shadowproxy replay`` and prints its verdict next to the live shadow's; says where
everything is; and stops every process it started, each by its process group, whatever
happened.

Each child is a separate process running the same commands a user would type, with its
output in ``DATA_DIR/logs/``; when one fails, the end of its log is part of the error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import yaml
from rich.console import Console

from shadowproxy.errors import DemoError, UsageError

ROUTE = "diabetes"
SHADOW = "candidate"
REPLAYED = "knn"
"""The third model: never mirrored; its answers come from ``shadowproxy replay --as knn``,
and ``shadowproxy report --shadow knn`` finds them as a replayed target."""
MAX_REQUESTS = 1_000_000
# Requests per second: traffic arrives at a pace, as from users. Unpaced, the client would
# send as fast as the primary answers, and on a small machine the shadow, which is not paced
# by anyone, falls behind until the proxy drops calls (max_in_flight) — correct behaviour,
# but not the story the demo tells.
DEMO_RATE = 400
REPLAY_CONCURRENCY = 8
STEPS = 8
START_TIMEOUT_S = 60.0
RECORD_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
LOG_TAIL_BYTES = 3000


@dataclass
class Child:
    """A process the demo started, in its own process group, logging to ``log``."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        """The end of the process's log, for an error message."""
        try:
            with self.log.open("rb") as f:
                f.seek(max(0, self.log.stat().st_size - LOG_TAIL_BYTES))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def failed(self, what: str) -> DemoError:
        tail = self.tail().strip()
        return DemoError(f"{self.name} {what} (log: {self.log})"
                         + (f"\n--- end of {self.log.name} ---\n{tail}" if tail else ""))


@dataclass
class Processes:
    """Every process the demo starts; ``close()`` stops them in reverse order of start."""

    log_dir: Path
    env: dict[str, str]
    cwd: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str]) -> Child:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            # A new session: a Ctrl-C at the terminal reaches only the demo, which then stops
            # each group in order, and killpg also reaches any worker the child forks.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                    start_new_session=True)
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def close(self, timeout_s: float = STOP_TIMEOUT_S) -> list[str]:
        """SIGTERM each group (last started first), then SIGKILL any that outlive the wait.

        Returns the names of the processes that had to be killed.
        """
        killed = []
        for child in reversed(self.children):
            if child.proc.poll() is None:
                _signal_group(child.proc.pid, signal.SIGTERM)
                try:
                    child.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    killed.append(child.name)
            # Kill the rest of the group too: a worker the child forked may outlive it.
            _signal_group(child.proc.pid, signal.SIGKILL)
            child.proc.wait()
        self.children.clear()
        return killed


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is already gone
        os.killpg(pgid, sig)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def examples_root() -> Path:
    """The source checkout holding ``examples/``; UsageError when it cannot be found."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "examples" / "model_service.py").is_file():
        raise UsageError(
            "shadowproxy demo runs the example model services of the source tree, and there "
            f"is no examples/ folder next to the package (looked in {root}); run it from a "
            "checkout: git clone the repository, then pip install -e '.[examples]'")
    # scikit-learn for the models; matplotlib for the HTML report's plots; pyarrow to read
    # the training data the report compares live inputs with.
    missing = [name for module, name in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"),
                                         ("pyarrow", "pyarrow"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise UsageError(f"the demo needs {', '.join(missing)}; install them with: "
                         "pip install -e '.[examples,report]'")
    return root


def demo_config(data_dir: Path, ports: dict[str, int]) -> dict[str, Any]:
    """The configuration the demo's proxy runs with (written to DATA_DIR/shadowproxy.yaml)."""
    features: dict[str, dict[str, Any]] = {
        "age": {"type": "numeric", "min": 0, "max": 120},
        "sex": {"type": "categorical", "allowed": [1, 2]},
        "bmi": {"type": "numeric", "min": 10, "max": 70},
        "bp": {"type": "numeric", "min": 30, "max": 250},
        "ltg": {"type": "numeric"},
        "glu": {"type": "numeric"},
    }
    for name, spec in features.items():
        spec["path"] = f"$.features.{name}"
    return {
        "listen": f"127.0.0.1:{ports['proxy']}",
        "admin_listen": f"127.0.0.1:{ports['admin']}",
        "workers": 1,
        "data_dir": str(data_dir),
        "database": {"url": None},  # the embedded PostgreSQL under data_dir
        "routes": [{
            "name": ROUTE,
            "match": {"path_prefix": "/predict", "methods": ["POST"]},
            "primary": {"url": f"http://127.0.0.1:{ports['primary']}", "timeout_s": 10},
            "shadows": [{"name": SHADOW, "url": f"http://127.0.0.1:{ports['candidate']}",
                         "timeout_s": 10, "set_headers": {"X-Shadow-Request": "1"}}],
            "compare": {
                "prediction": "$.prediction",
                "task": "regression",
                "ignore": ["$.model_version"],
                "features": features,
                "slices": {
                    "age": {"feature": "age", "bins": [0, 40, 60, 120]},
                    "obese": "(request_body_json #>> '{features,bmi}')::float >= 30",
                },
            },
        }],
    }


def wait_http(child: Child, url: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll ``url`` until it answers 200, failing early if ``child`` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if child.proc.poll() is not None:
            raise child.failed(f"exited with status {child.proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or not ready (503)
        if time.monotonic() > deadline:
            raise child.failed(f"did not answer {url} within {timeout_s:.0f}s")
        time.sleep(0.2)


async def db_now(url: str) -> datetime:
    from shadowproxy.store.database import connection

    async with connection(url) as conn:
        now: datetime = await conn.fetchval("SELECT now()")
        return now


async def _wait_records(url: str, route: str, since: datetime, expected: int, proxy: Child,
                        timeout_s: float) -> int:
    """Poll the requests table until ``expected`` records of ``route`` since ``since`` are
    there (or the time is up); DemoError if the proxy exits meanwhile."""
    from shadowproxy.store.database import connection

    async with connection(url) as conn:
        deadline = time.monotonic() + timeout_s
        while True:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM shadowproxy.requests "
                "WHERE route = $1 AND received_at >= $2", route, since)
            if count >= expected or time.monotonic() > deadline:
                return count
            if proxy.proc.poll() is not None:
                raise proxy.failed(f"exited with status {proxy.proc.returncode} after "
                                   f"recording {count} of {expected} requests")
            await asyncio.sleep(0.2)


def _run_step(argv: list[str], env: dict[str, str], cwd: Path, what: str, *,
              stdout: IO[str] | int | None = subprocess.PIPE,
              stderr: IO[str] | int | None = subprocess.PIPE) -> str:
    """Run one command to completion and return its output; DemoError if it fails.

    ``None`` for ``stdout`` or ``stderr`` sends that stream straight to the terminal.
    """
    proc = subprocess.run(argv, env=env, cwd=cwd, stdout=stdout, stderr=stderr, text=True,
                          check=False)
    if proc.returncode != 0:
        output = (proc.stdout or "")[-LOG_TAIL_BYTES:] + (proc.stderr or "")[-LOG_TAIL_BYTES:]
        raise DemoError(f"{what} failed with status {proc.returncode}: "
                        f"{' '.join(argv[1:])}" + (f"\n{output}" if output else ""))
    return proc.stdout or ""


def _verdict(report: list[str], shadow: str, env: dict[str, str], root: Path
             ) -> tuple[str, str]:
    """(status, its first reason) of the report on ``shadow`` (``report`` is the command
    of the live shadow's report)."""
    argv = [*report[:report.index("--shadow")], "--shadow", shadow,
            *report[report.index("--shadow") + 2:], "--format", "json"]
    doc = json.loads(_run_step(argv, env, root, f"the report on {shadow}"))
    verdict = doc["verdict"]
    reasons = [r["message"] for r in verdict["reasons"] if r["level"] == verdict["status"]]
    return verdict["status"], (reasons[0] if reasons else "")


def _count_lines(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for _ in f) - 1  # minus the header


def run_demo(args: argparse.Namespace) -> int:
    """The ``demo`` command."""
    return run_story(args, MAX_REQUESTS, examples_root, STEPS, _demo)


@dataclass
class Story:
    """One run of a demo command: its data directory, terminal, children and numbered steps
    (``shadowproxy demo`` and ``shadowproxy demo --generative`` tell theirs with it)."""

    requests: int
    data_dir: Path
    console: Console
    env: dict[str, str]
    root: Path
    children: Processes
    steps: int
    python: str = sys.executable
    step: int = 0
    started: float = field(default_factory=time.monotonic)

    def say(self, text: str) -> None:
        """Announce the next step."""
        self.step += 1
        self.console.print(f"[bold cyan][{self.step}/{self.steps}][/] {text}")

    def run(self, argv: list[str], what: str, *,
            stdout: IO[str] | int | None = subprocess.PIPE,
            stderr: IO[str] | int | None = subprocess.PIPE) -> str:
        """One command to completion (``_run_step``) in the children's environment."""
        return _run_step(argv, self.env, self.root, what, stdout=stdout, stderr=stderr)

    def start_database(self) -> str:
        """The embedded PostgreSQL under the data directory, migrated; its URL."""
        from shadowproxy.store.embedded import start_embedded
        from shadowproxy.store.migrate import migrate

        self.say(f"PostgreSQL (embedded) in {self.data_dir / 'postgres'}")
        db_url = start_embedded(self.data_dir, cleanup="stop")
        asyncio.run(migrate(db_url))
        return db_url

    def wait_recorded(self, db_url: str, route: str, since: datetime, expected: int,
                      proxy: Child, what: str) -> datetime:
        """Wait until the ``expected`` exchanges (``what`` they are) since ``since`` are
        recorded, or fail; the database's time then, which ends the report's window."""
        recorded = asyncio.run(_wait_records(db_url, route, since, expected, proxy,
                                             RECORD_TIMEOUT_S))
        if recorded < expected:
            raise proxy.failed(f"recorded {recorded} of {expected} {what} "
                               f"within {RECORD_TIMEOUT_S:.0f}s")
        window_end = asyncio.run(db_now(db_url))
        self.console.print(f"    {recorded} exchanges recorded")
        return window_end

    def write_config(self, config: dict[str, Any], command: str) -> Path:
        """DATA_DIR/shadowproxy.yaml, written by ``command``."""
        path = self.data_dir / "shadowproxy.yaml"
        path.write_text(
            f"# Written by `{command}`; ports are chosen afresh on every run.\n"
            + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return path

    def start_proxy(self, config_path: Path, ports: dict[str, int]) -> Child:
        """``shadowproxy run`` on the config, once its /readyz says ready."""
        self.say(f"shadowproxy on 127.0.0.1:{ports['proxy']} (admin :{ports['admin']})")
        proxy = self.children.start("shadowproxy", [self.python, "-m", "shadowproxy", "run",
                                                    "-c", str(config_path)])
        wait_http(proxy, f"http://127.0.0.1:{ports['admin']}/readyz")
        return proxy

    def import_labels(self, config_path: Path, labels: Path, what: str) -> None:
        """``shadowproxy labels import`` of the traffic's labels (``what`` they are)."""
        imported = self.run([self.python, "-m", "shadowproxy", "labels", "import", "-c",
                             str(config_path), str(labels)], "importing labels").strip()
        self.console.print(f"    {what} as labels: {imported.splitlines()[0]}"
                           if imported else f"    {what} imported as labels")

    def report(self, report: list[str]) -> Path:
        """The report (``report`` is its command) to the terminal, and as HTML; its path."""
        sys.stdout.flush()
        self.run(report, "the report", stdout=None)  # to the terminal
        html = self.data_dir / "report.html"
        self.run(report + ["--format", "html", "-o", str(html)], "the HTML report")
        return html

    def finish(self, what: str, html: Path, config_path: Path, psql_query: str) -> int:
        """Stop the children (``what`` they are) and say where everything is."""
        self.say(f"stopping {what}")
        killed = self.children.close()
        data_dir = self.data_dir
        if killed:
            raise DemoError(f"{', '.join(killed)} did not stop within {STOP_TIMEOUT_S:.0f}s "
                            f"of SIGTERM and was killed; see {data_dir / 'logs'}")
        elapsed = time.monotonic() - self.started
        console = self.console
        console.print(f"\n[bold green]Done in {elapsed:.0f}s.[/] Everything is under {data_dir}:")
        for label, where in (
                ("HTML report", str(html)),
                ("database", f'psql "$(shadowproxy db-url -c {config_path})"'),
                ("", "(the embedded PostgreSQL stopped with the demo; db-url starts it again)"),
                ("try in psql", psql_query),
                ("config", str(config_path)),
                ("logs", str(data_dir / "logs"))):
            console.print(f"  [bold]{label:<12}[/] {where}", soft_wrap=True)
        return 0


def run_story(args: argparse.Namespace, max_requests: int, root: Callable[[], Path],
              steps: int, story: Callable[[Story], int]) -> int:
    """A demo command: check ``--requests``, find the examples (``root``), make
    ``--data-dir``, and tell ``story``; every process it started is stopped, whatever
    happened."""
    if not 1 <= args.requests <= max_requests:
        raise UsageError(f"--requests: expected 1 to {max_requests} (got {args.requests})")
    examples = root()
    data_dir = Path(args.data_dir).resolve()
    try:
        (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--data-dir {data_dir}: cannot create it: {exc.strerror}") from exc
    console = Console(highlight=False)
    env = {k: v for k, v in os.environ.items()
           # The demo's own embedded database, never one a variable points at.
           if k not in ("SHADOWPROXY_DATABASE_URL", "PYTHONPATH")}
    env["PYTHONPATH"] = str(examples)
    children = Processes(data_dir / "logs", env, examples)
    try:
        return story(Story(args.requests, data_dir, console, env, examples, children, steps))
    finally:
        killed = children.close()
        if killed:
            console.print(f"[yellow]had to kill {', '.join(killed)} (no exit within "
                          f"{STOP_TIMEOUT_S:.0f}s of SIGTERM)[/]")


def _demo(story: Story) -> int:
    python, console, data_dir = story.python, story.console, story.data_dir
    db_url = story.start_database()
    ports = {name: free_port() for name in ("primary", "candidate", REPLAYED, "proxy", "admin")}
    config_path = story.write_config(demo_config(data_dir, ports), "shadowproxy demo")

    story.say(f"model services: primary = linear on :{ports['primary']}, "
              f"shadow '{SHADOW}' = gradient boosting on :{ports['candidate']} (training...)")
    # The third model trains now too, to save the wait later; nothing calls it until step 7.
    models = [story.children.start(name, [python, "-m", "examples.model_service", "--model",
                                          kind, "--port", str(ports[name])])
              for name, kind in (("primary", "linear"), ("candidate", "gbm"),
                                 (REPLAYED, REPLAYED))]
    for child in models[:2]:
        wait_http(child, f"http://127.0.0.1:{ports[child.name]}/healthz")

    proxy = story.start_proxy(config_path, ports)

    story.say(f"sending {story.requests} requests through the proxy, {DEMO_RATE} a second")
    window_start = asyncio.run(db_now(db_url))
    labels = data_dir / "labels.csv"
    sys.stdout.flush()
    summary = story.run(  # stderr to the terminal: that is where the progress bar is drawn
        [python, "-m", "examples.traffic", "--url", f"http://127.0.0.1:{ports['proxy']}/predict",
         "--requests", str(story.requests), "--rate", str(DEMO_RATE), "--labels", str(labels)],
        "sending traffic", stderr=None).strip()
    console.print(f"    {summary}")
    answered = _count_lines(labels)
    if answered == 0:
        raise proxy.failed("answered none of the requests")

    story.say("waiting for the records to reach PostgreSQL")
    window_end = story.wait_recorded(db_url, ROUTE, window_start, answered, proxy,
                                     "answered requests")
    story.import_labels(config_path, labels, "true outcomes")

    story.say("the comparison report")
    reference = data_dir / "training.csv"
    story.run([python, "-m", "examples.dataset", "--training-csv", str(reference)],
              "writing the training data")
    report = [python, "-m", "shadowproxy", "report", "-c", str(config_path), "--route", ROUTE,
              "--shadow", SHADOW, "--from", window_start.isoformat(),
              "--to", window_end.isoformat(), "--reference", str(reference)]
    html = story.report(report)

    story.say(f"a model that did not exist when the traffic came in: '{REPLAYED}' = k-nearest "
              f"neighbours on :{ports[REPLAYED]}; replaying the recorded traffic to it")
    wait_http(models[2], f"http://127.0.0.1:{ports[REPLAYED]}/healthz")
    sys.stdout.flush()
    story.run([python, "-m", "shadowproxy", "replay", "-c", str(config_path), "--route", ROUTE,
               "--to", f"http://127.0.0.1:{ports[REPLAYED]}", "--as", REPLAYED,
               "--from", window_start.isoformat(), "--to", window_end.isoformat(),
               "--concurrency", str(REPLAY_CONCURRENCY)],
              "the replay", stdout=None, stderr=None)
    verdicts = {name: _verdict(report, name, story.env, story.root)
                for name in (SHADOW, REPLAYED)}
    console.print("    verdicts against the primary, over the same requests:")
    for name, how in ((SHADOW, "live shadow"), (REPLAYED, "replayed")):
        status, reasons = verdicts[name]
        colour = {"pass": "green", "warn": "yellow", "fail": "red"}.get(status, "white")
        console.print(f"      {name:<10} {how:<12} [bold {colour}]{status.upper():<5}[/] "
                      f"{reasons}")

    return story.finish(
        "the proxy and the models", html, config_path,
        "SELECT shadow_name, count(*), avg(abs((shadow_body_json->>'prediction')::float - "
        "(primary_body_json->>'prediction')::float)) AS mean_abs_diff FROM shadowproxy.pairs "
        "GROUP BY 1;")
