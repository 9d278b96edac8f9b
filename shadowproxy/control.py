"""``shadowproxy reload -c FILE``: find the running proxy, make it reload, print the outcome.

A running proxy (or, with ``workers: N``, its supervisor) writes ``data_dir/run/
shadowproxy.json`` at start (its pid, the config file it runs, its admin address) and
removes it at a clean stop; after every reload it writes the outcome to ``data_dir/run/
reload.json`` with a sequence number and the time the reload started reading the file.
The command reads the first, sends the process SIGHUP (the permission to signal it is the
permission to reload it: no token is needed, and the admin listener may be off), and
waits for the outcome of a reload that started after it signalled: one already under way
(``watch``, another ``reload``) read the file before the edit the command is run for.
Signals do not queue, and two commands may be answered by one reload; the first reload to
start after the signal is the answer, also when a later one has already written its own
outcome over it (``unchanged``, the edit being applied). The running process validates the
file itself, with its own environment: the outcome it writes is the one that counts.

Exit status: 0 applied or unchanged; 2 the file is invalid (every problem printed, nothing
changed), or the process runs another file; 1 no running proxy found, no answer in time, or
the process stopped instead of reloading.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from shadowproxy.durations import finite_seconds
from shadowproxy.errors import ConfigError, DataDirInUse, ShadowProxyError, UsageError
from shadowproxy.private import open_private, private_directory

log = logging.getLogger("shadowproxy")

LOCK_FILE = "lock"
"""In ``data_dir/run``: locked by the running proxy (or supervisor) while it runs."""
PROCESS_FILE = "shadowproxy.json"
"""In ``data_dir/run``: where the running proxy (or supervisor) is."""
OUTCOME_FILE = "reload.json"
"""In ``data_dir/run``: the last reload's outcome, with a sequence number and the time it
started reading the file (``time.monotonic()``), and the ``OUTCOMES_KEPT - 1`` before it."""
OUTCOMES_KEPT = 8
DEFAULT_TIMEOUT_S = 30.0


# --- the running process's side ---------------------------------------------------------

def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a reader never sees half of it), readable by
    this user only: these files may name the configuration's values."""
    private_directory(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # (half written, on a full disk)
        raise


def claim(run_dir: Path) -> int:
    """Claim ``run_dir`` for this process until it closes the returned descriptor or exits
    (``kill -9`` included: the kernel releases the lock); DataDirInUse when another process
    holds it. Two proxies on one data_dir would take each other's place in the process file
    (``shadowproxy reload`` of one reaches the other, and finds none once the other stops)
    and in the configuration a supervisor hands its workers at a reload."""
    data_dir = run_dir.parent
    try:
        private_directory(run_dir)
        fd = open_private(run_dir / LOCK_FILE, os.O_RDWR)
    except OSError as exc:
        raise DataDirInUse(f"data_dir {data_dir}: cannot create {run_dir / LOCK_FILE}: "
                           f"{exc.strerror}; make the directory writable by this user, "
                           "or set data_dir to one that is") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip()
        os.close(fd)
        who = f"pid {holder}" if holder.isdigit() else "another process"
        running = _process_file(run_dir)  # the file it runs, when it has said where it is
        if running is not None and str(running.get("pid")) == holder and "config" in running:
            who = f"{running['config']}, {who}"
        raise DataDirInUse(
            f"data_dir {data_dir} is in use by another `shadowproxy run` ({who}): two "
            "proxies cannot share one (`shadowproxy reload` finds its proxy there); give "
            "this one a data_dir of its own (the `data_dir` key), or stop the other "
            "first") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    except OSError:
        # A full disk: the lock holds all the same; only another proxy's message names
        # this one less precisely ("another process").
        pass
    return fd


def write_process_file(run_dir: Path, config: Path, admin: str | None) -> None:
    """Say where this process is, for ``shadowproxy reload`` (and forget the outcome of an
    earlier process's last reload). A file that cannot be written (a full disk) is said
    in the log, and the proxy serves all the same: it ended the start with a traceback,
    for a file only the command needs."""
    try:
        (run_dir / OUTCOME_FILE).unlink(missing_ok=True)
        data = {"pid": os.getpid(), "config": os.path.abspath(config), "admin": admin}
        write_private(run_dir / PROCESS_FILE, json.dumps(data))
    except OSError as exc:
        log.error("cannot write %s (%s): `shadowproxy reload -c %s` will not find this "
                  "process (pid %d); SIGHUP, or POST /-/reload on the admin listener, "
                  "reloads it", run_dir / PROCESS_FILE, exc.strerror or exc, config,
                  os.getpid())


def _process_file(run_dir: Path) -> dict[str, Any] | None:
    """What the running proxy wrote in ``run_dir/shadowproxy.json``; None when the file is
    missing or unreadable."""
    try:
        data = json.loads((run_dir / PROCESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove_process_file(run_dir: Path) -> None:
    """At a stop: remove the file if it is still this process's."""
    process = _process_file(run_dir)
    if process is not None and process.get("pid") == os.getpid():
        with contextlib.suppress(OSError):
            (run_dir / PROCESS_FILE).unlink()


# --- the command --------------------------------------------------------------------------

_DATA_DIR_LINE = re.compile(r"""^data_dir:[ \t]*["']?([^"'#\r\n]*?)["']?[ \t]*(?:#.*)?$""",
                            re.MULTILINE)


def _data_dir(config: Path) -> tuple[Path, list[str]]:
    """The data_dir the file names, and its problems if it is invalid (the directory is then
    read from the raw YAML, or from its top-level ``data_dir:`` line if YAML cannot read it,
    so that the running process can still be asked and say what is wrong)."""
    from shadowproxy.config import load_config

    try:
        return load_config(config).data_dir, []
    except ConfigError as exc:
        problems = exc.problems
    value: object = None
    try:
        text = config.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    try:
        raw = yaml.safe_load(text)
        value = raw.get("data_dir") if isinstance(raw, dict) else None
    except Exception:  # PyYAML raises more than YAMLError (a bad date: ValueError)
        line = _DATA_DIR_LINE.search(text)
        value = line.group(1) if line else None
    if not isinstance(value, str) or not value or "${" in value:
        value = ".shadowproxy"
    return Path(value).resolve(), problems


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _seq(run_dir: Path, pid: int) -> int:
    """The sequence number of process ``pid``'s last reload outcome (-1: none yet)."""
    try:
        outcome = json.loads((run_dir / OUTCOME_FILE).read_text())
        return int(outcome["seq"]) if outcome.get("pid") == pid else -1
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return -1


def reload_outcome(run_dir: Path, pid: int, after_seq: int, after: float
                   ) -> dict[str, Any] | None:
    """The outcome of process ``pid``'s first reload numbered above ``after_seq`` that
    started at ``after`` (``time.monotonic()``, the same clock in every process of the
    machine) or later; None if there is none yet."""
    try:
        last = json.loads((run_dir / OUTCOME_FILE).read_text())
        if last.get("pid") != pid:
            return None
        for outcome in (*last.get("earlier", ()), last):
            # (No start time: written by a proxy of an earlier version, which kept none.)
            if int(outcome["seq"]) > after_seq and float(outcome.get("started", after)) >= after:
                found: dict[str, Any] = outcome
                return found
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # being replaced: read it again
    return None


def _claimed_by(run_dir: Path) -> int | None:
    """The process that holds ``run_dir``'s claim (``claim``) now, from the kernel's table of
    file locks (Linux's /proc/locks); None when none does or it cannot be told. Read, not
    tried: taking the lock, even shared, could make a proxy starting at that moment find
    its data_dir in use."""
    try:
        st = os.stat(run_dir / LOCK_FILE)
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            table = f.read()
    except OSError:
        return None
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; a waiter's line has "->" too.
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == ident:
            with contextlib.suppress(ValueError):
                return int(fields[4])
    return None


def _not_taking_reloads(config: Path, data_dir: Path, run_dir: Path) -> ShadowProxyError | None:
    """The error for a proxy that holds ``data_dir`` but has not said where it is: one
    stopping (its process file goes at the stop's first step) or starting (the file comes
    once it serves). It was said to be no running proxy at all."""
    holder = _claimed_by(run_dir)
    if holder is None:
        return None
    return ShadowProxyError(
        f"shadowproxy (pid {holder}) holds data_dir {data_dir} but takes no reload now: it "
        "is stopping, or starting and not serving yet; once it serves, run the command again "
        f"(a proxy that was starting may have read {config} before this edit); once it has "
        "stopped, the file applies when it is started again")


def _same_file(a: str, b: Path) -> bool:
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def request_reload(config: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Make the proxy running ``config`` reload it; its outcome (``ReloadOutcome.as_dict``).

    Raises ConfigError when no proxy runs and the file is invalid, ShadowProxyError when no
    proxy runs or none answers in time, UsageError when the proxy runs another file.
    """
    data_dir, problems = _data_dir(config)
    run_dir = data_dir / "run"
    process = _process_file(run_dir) or {}
    try:
        pid = int(process["pid"])
    except (ValueError, KeyError, TypeError):
        if problems:
            raise ConfigError(problems) from None
        busy = _not_taking_reloads(config, data_dir, run_dir)
        if busy is not None:
            raise busy from None
        raise ShadowProxyError(
            f"no running shadowproxy found for {config}: {run_dir / PROCESS_FILE} is missing "
            f"(a proxy started with `shadowproxy run -c {config}` writes it; data_dir is "
            f"{data_dir})") from None
    if not _alive(pid):
        if problems:
            raise ConfigError(problems)
        busy = _not_taking_reloads(config, data_dir, run_dir)  # a new one starting
        if busy is not None:
            raise busy
        raise ShadowProxyError(f"no running shadowproxy found for {config}: process {pid} "
                               f"of {run_dir / PROCESS_FILE} is gone")
    if not _same_file(process.get("config", ""), config):
        raise UsageError(f"the shadowproxy running with data_dir {data_dir} (pid {pid}) runs "
                         f"{process.get('config')}, not {config}: edit that file and reload "
                         f"it, or give its path to -c")
    before = _seq(run_dir, pid)
    signalled = time.monotonic()
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError as exc:
        raise ShadowProxyError(f"not allowed to signal shadowproxy (pid {pid}): run "
                               "`shadowproxy reload` as the user that runs it") from exc
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        gone = not _alive(pid)  # before the outcome is read: it may write one, then exit
        outcome = reload_outcome(run_dir, pid, before, signalled)
        if outcome is not None:
            return outcome
        if gone:
            # Stopping, it ignores a reload (SIGHUP) and writes no outcome: waiting for one
            # until the timeout said only that it did not answer.
            raise ShadowProxyError(f"shadowproxy (pid {pid}) stopped without reloading "
                                   f"{config}: a proxy that is stopping takes no reload; "
                                   "the file applies when it is started again")
        time.sleep(0.02)
    raise ShadowProxyError(f"shadowproxy (pid {pid}) did not report the reload within "
                           f"{timeout_s:g} s; see its log")


def print_outcome(outcome: dict[str, Any]) -> int:
    """Print what a reload did; the exit status for it."""
    result = outcome["result"]
    if result == "rejected":
        print(f"rejected: the file is invalid, nothing changed (version "
              f"{outcome['version']} runs)", file=sys.stderr)
        for problem in outcome["errors"]:
            print(problem, file=sys.stderr)
        return ConfigError.exit_status
    if result == "unchanged":
        print(f"unchanged: version {outcome['version']} runs")
    else:
        print(f"applied: version {outcome['previous_version']} -> {outcome['version']}")
    for change in outcome.get("changes", []):
        print(f"  {change}")
    for worker in outcome.get("workers") or []:
        pid = "" if worker["pid"] is None else f" (pid {worker['pid']})"
        if worker.get("starting"):
            print(f"  worker {worker['worker']}{pid}: starting; it runs version "
                  f"{outcome['version']} once it listens")
        else:
            print(f"  worker {worker['worker']}{pid}: version {worker['config_version']}")
    for line in outcome.get("restart_needed", []):
        print(f"needs a restart: {line}", file=sys.stderr)
    return 0


def run_reload(args: argparse.Namespace) -> int:
    """The CLI command."""
    # Checked before the proxy is signalled: it would reload, and the command then say that
    # it did not answer.
    if not args.timeout > 0:  # NaN too
        raise UsageError(f"--timeout: expected a number of seconds above 0 (got "
                         f"{args.timeout:g}), e.g. --timeout 60")
    try:
        finite_seconds(args.timeout, "a proxy that never answers would be waited for "
                                     "ever; give the longest the reload may take, e.g. "
                                     "--timeout 600")
    except ValueError as exc:
        raise UsageError(f"--timeout: {exc}") from None
    return print_outcome(request_reload(Path(args.config), args.timeout))
