"""Reloading the configuration while serving: versions, and what can change live.

Every loaded configuration has a ``config_version``: a short hash of its normalized
content, stamped on each recorded request, shown by ``/readyz`` and
``shadowproxy_config_info``. A reload validates the whole new file first; an invalid file
changes nothing. A valid one is applied except for the settings below, which are bound to
resources made once at start-up (a listening socket, the worker processes, the database
connection and its spool, the recorder's queue): those keep their running values until the
next restart, and the reload says so. The version always names what actually runs.

A valid file that fails to be applied (with workers, the supervisor cannot write their
configuration: a full disk, a read-only run directory) is rejected like an invalid one, but
it is no fault of the file: under ``watch: true``, which counts the file as loaded, it is
tried again, at first after ``watch_interval_s`` and then twice as long each time up to
``RETRY_MAX_S``, until it applies (or another reload applies). The failure is logged once
for each kind of error, and its end once. Not tried again, it waited for the next edit
of the file, and the proxy ran the old configuration with the file saying otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from shadowproxy import control
from shadowproxy.config import Settings, load_config
from shadowproxy.configwatch import ConfigWatcher, content_digest, digest_of, read_content
from shadowproxy.errors import ConfigError
from shadowproxy.metrics import Metrics
from shadowproxy.tasks import spawn

log = logging.getLogger("shadowproxy")

RESTART_ONLY: dict[tuple[str, ...], str] = {
    ("listen",): "the client listener is bound once; rebinding would drop connections",
    ("admin_listen",): "the admin listener is bound once",
    ("workers",): "worker processes are started once",
    ("data_dir",): "the spool and the embedded database live there",
    ("database",): "the recorder holds its connection and spool for this database",
    ("admin_token",): "the admin listener is built once",
    ("recording", "queue_max_records"): "the recorder's queue is sized once",
    ("recording", "queue_max_bytes"): "the recorder's queue is sized once",
    ("recording", "batch_max_records"): "the recorder's writer is set up once",
    ("recording", "write_after_records"): "the recorder's writer is set up once",
    ("recording", "flush_interval_ms"): "the recorder's writer is set up once",
    ("recording", "spool_max_bytes"): "the spool is sized once",
}
"""Settings a reload cannot change, and why; everything else applies to the next request."""

RETRY_MAX_S = 60.0
"""The longest wait between tries of a watched file that failed to be applied."""


def config_version(settings: Settings) -> str:
    """A short, stable hash of the configuration's normalized content (12 hex digits).

    Normalized: the validated settings with every default filled in, keys sorted, so that
    reformatting the file, reordering keys or spelling out a default keeps the version.
    """
    data = settings.model_dump(mode="json")
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _get(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        data = data[key]
    return data


def _set(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


def effective_settings(running: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """``new`` with the restart-only settings kept at their running values, and one line for
    each such setting that the new file changes."""
    old_data = running.model_dump()
    new_data = new.model_dump()
    pinned = []
    for path, why in RESTART_ONLY.items():
        old_value = _get(old_data, path)
        if _get(new_data, path) != old_value:
            pinned.append(f"{'.'.join(path)}: changed in the file, kept as it runs until a "
                          f"restart ({why})")
            _set(new_data, path, old_value)
    if not pinned:
        return new, []
    return Settings.model_validate(new_data), pinned


@dataclass
class ReloadOutcome:
    """What a reload did, for the log, the admin endpoint and ``shadowproxy reload``."""

    result: Literal["applied", "unchanged", "rejected"]
    version: str
    """The configuration running after the reload."""
    previous_version: str
    errors: list[str] = field(default_factory=list)
    """Every problem of a rejected file, as FILE:LINE: key.path: message."""
    restart_needed: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    """What the reload changed, in words (``describe_changes``)."""
    workers: list[dict[str, Any]] | None = None
    """With ``workers: N``: each worker's version once the reload reached it."""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"result": self.result, "version": self.version,
               "previous_version": self.previous_version, "errors": self.errors,
               "restart_needed": self.restart_needed, "changes": self.changes}
        if self.workers is not None:
            out["workers"] = self.workers
        return out


def describe_changes(old: Settings, new: Settings) -> list[str]:
    """What differs between two configurations, one short line per route (one for a new
    order of the routes, and one for the rest): ``route r: shadow s2 added, shadow s1
    changed``."""
    lines = []
    old_routes = {r.name: r for r in old.routes}
    new_routes = {r.name: r for r in new.routes}
    # Sorted: a set's order of strings differs from one process to the next, and so did
    # the log line of the same reload.
    for name in sorted(new_routes.keys() - old_routes.keys()):
        lines.append(f"route {name}: added")
    for name in sorted(old_routes.keys() - new_routes.keys()):
        lines.append(f"route {name}: removed")
    for name in sorted(old_routes.keys() & new_routes.keys()):
        before, after = old_routes[name], new_routes[name]
        if before == after:
            continue
        parts = [f"{key} changed" for key in type(after).model_fields
                 if key not in ("name", "shadows")
                 and getattr(before, key) != getattr(after, key)]
        old_shadows = {s.name: s for s in before.shadows}
        new_shadows = {s.name: s for s in after.shadows}
        for shadow in after.shadows:
            if shadow.name not in old_shadows:
                parts.append(f"shadow {shadow.name} added")
            elif old_shadows[shadow.name] != shadow:
                was = old_shadows[shadow.name]
                keys = [k for k in type(shadow).model_fields
                        if getattr(was, k) != getattr(shadow, k)]
                parts.append(f"shadow {shadow.name} changed ({', '.join(keys)})")
        parts += [f"shadow {n} removed" for n in old_shadows if n not in new_shadows]
        lines.append(f"route {name}: " + (", ".join(parts) or "shadow order changed"))
    # Among routes of one path_prefix, the first in the file that admits the method takes
    # the request: a reload that only reorders them changes where requests go.
    kept = [r.name for r in new.routes if r.name in old_routes]
    if kept != [r.name for r in old.routes if r.name in new_routes]:
        lines.append(f"route order changed: {', '.join(r.name for r in new.routes)}")
    rest = [key for key in type(new).model_fields
            if key != "routes" and getattr(old, key) != getattr(new, key)]
    if rest:
        lines.append(f"changed: {', '.join(rest)}")
    return lines


Apply = Callable[[Settings, str], Awaitable[list[dict[str, Any]] | None]]
"""Makes a validated configuration the running one (a proxy process swaps its router; a
supervisor passes it on to its workers and returns each worker's version)."""

class Reloader:
    """The one path of every trigger (SIGHUP, ``POST /-/reload``, ``shadowproxy reload``,
    ``watch``): read and validate the whole file, keep the restart-only settings, apply,
    count, log, and tell the caller. Reloads run one at a time."""

    def __init__(self, path: Path, running: Settings, apply: Apply, metrics: Metrics,
                 run_dir: Path, *, digest: str | None = None) -> None:
        """``digest``: the digest of the bytes ``running`` was loaded from (``digest_of``);
        None: the file's content now. Taken now when the start had
        read the file seconds before (the embedded database starts in between), an edit
        made meanwhile counted as loaded, and ``watch`` never applied it."""
        self.path = path
        self.settings = running
        self.version = config_version(running)
        self.restart_needed: list[str] = []
        """Settings the file changes that keep their running values until a restart."""
        self._apply = apply
        self._metrics = metrics
        self._run_dir = run_dir
        self._lock = asyncio.Lock()
        self._seq = 0
        self._written: deque[dict[str, Any]] = deque(maxlen=control.OUTCOMES_KEPT)
        """The last outcomes written, newest last (``control.OUTCOME_FILE``)."""
        self._watcher: ConfigWatcher | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._digest = digest if digest is not None else content_digest(path)
        """The file's content when it was last read by a reload (or at start)."""
        self._closed = False
        self._failing: tuple[str, int | None] | None = None
        """The kind of error (type, errno) that the last try to apply a valid file failed
        with, while it fails: logged once for each kind."""
        self._failures = 0
        """Tries in a row that failed to apply a valid file."""
        self._retry_task: asyncio.Task[None] | None = None

    # --- triggers ---
    async def reload(self, trigger: str) -> ReloadOutcome:
        """Reload the file; never raises for a bad file (the outcome says what was wrong)."""
        async with self._lock:
            if self._closed:
                log.info("config reload (%s) ignored: stopping", trigger)
                return ReloadOutcome("unchanged", self.version, self.version)
            # Before the file is read: ``shadowproxy reload`` takes the outcome of a reload
            # that started after it signalled, not one that read the file before its edit.
            started = time.monotonic()
            failures = self._failures
            outcome = await self._reload(trigger)
            if self._failures == failures:  # applied, unchanged, or a file now invalid
                self._failing, self._failures = None, 0
            self._seq += 1
            self._write_outcome(outcome, started)
            self._update_watch()
            self._retry_if_failing()
            return outcome

    async def _reload(self, trigger: str) -> ReloadOutcome:
        loop = asyncio.get_running_loop()
        previous = self.version
        # Read once, and what is read is loaded: the watcher is told of the content that was
        # validated. Read a second time to be loaded, a file rewritten in place meanwhile was caught
        # half-written and rejected while the watcher counted the whole file as loaded, and
        # never offered it again. Told before loading, the watcher sees an edit made meanwhile.
        data = read_content(self.path)
        digest = self._digest = digest_of(data)
        if self._watcher is not None:
            self._watcher.loaded(digest)
        try:
            # Off the event loop: parsing and validating must not hold up client requests.
            new = await loop.run_in_executor(None, functools.partial(load_config, self.path,
                                                                     data=data))
        except ConfigError as exc:
            return self._rejected(trigger, previous, list(exc.problems))
        except Exception as exc:  # a file the checks did not foresee: still only rejected
            log.exception("config reload (%s): reading %s failed", trigger, self.path)
            return self._rejected(trigger, previous, [
                f"{self.path}: cannot be read ({type(exc).__name__}: {exc}); "
                "see the log for where it failed"])
        applied, pinned = effective_settings(self.settings, new)
        for line in pinned:
            log.warning("config reload (%s): %s", trigger, line)
        self.restart_needed = pinned
        version = config_version(applied)
        if version == previous:
            self._metrics.reloads["applied"] += 1
            log.info("config reload (%s): version %s unchanged", trigger, version)
            return ReloadOutcome("unchanged", version, previous, restart_needed=pinned)
        changes = describe_changes(self.settings, applied)
        try:
            workers = await self._apply(applied, version)
        except Exception as exc:  # e.g. the workers' file not written (a full disk)
            return self._not_applied(trigger, previous, version, exc)
        self._metrics.reloads["applied"] += 1
        self.settings, self.version = applied, version
        if self._failing is not None:
            log.info("config reload (%s): version %s applied at last, after %d failed "
                     "%s", trigger, version, self._failures,
                     "try" if self._failures == 1 else "tries")
        log.info("config reloaded (%s): version %s -> %s%s", trigger, previous, version,
                 "".join(f"; {c}" for c in changes))
        return ReloadOutcome("applied", version, previous, restart_needed=pinned,
                             changes=changes, workers=workers)

    def _not_applied(self, trigger: str, previous: str, version: str,
                     exc: Exception) -> ReloadOutcome:
        """A valid file that failed to be applied: rejected, logged once per kind of error
        while it keeps failing (``_retry_if_failing`` tries it again)."""
        kind = (type(exc).__name__, getattr(exc, "errno", None))
        problem = (f"{self.path}: version {version} could not be applied "
                   f"({type(exc).__name__}: {exc}); version {previous} keeps running")
        self._failures += 1
        if kind == self._failing and self._watcher is not None:  # said at the first try
            self._metrics.reloads["rejected"] += 1
            log.debug("config reload (%s): %s (again)", trigger, problem)
            return ReloadOutcome("rejected", previous, previous, errors=[problem],
                                 restart_needed=self.restart_needed)
        self._failing = kind
        # A disk's error says all there is; anything else gets its traceback, once.
        log.error("config reload (%s): applying version %s failed", trigger, version,
                  exc_info=not isinstance(exc, OSError))
        if self._watcher is not None:
            problem += (f"; tried again from {self._watcher.interval_s:g} s on, twice as "
                        f"long each time up to {RETRY_MAX_S:g} s (the log says when it "
                        "applies)")
        return self._rejected(trigger, previous, [problem])

    def _retry_if_failing(self) -> None:
        """Under ``watch: true``, try a valid file that failed to be applied again later:
        the watcher counts it as loaded, and offers it again only once it changes."""
        self._cancel_retry()  # another trigger's reload applied, or failed: wait anew
        if self._failing is None or self._watcher is None or self._closed:
            return
        delay = min(self._watcher.interval_s * 2 ** (self._failures - 1), RETRY_MAX_S)
        self._retry_task = spawn(self._retry(delay), name="config-retry")

    async def _retry(self, delay: float) -> None:
        await asyncio.sleep(delay)
        # A task of its own, as a watched change's: cancelling the wait (a reload from
        # another trigger, the stop) must not cut a reload under way.
        await asyncio.shield(spawn(self.reload("watch, tried again"), name="config-reload"))

    def _cancel_retry(self) -> None:
        if self._retry_task is not None:
            self._retry_task.cancel()
            self._retry_task = None

    def _rejected(self, trigger: str, previous: str, problems: list[str]) -> ReloadOutcome:
        self._metrics.reloads["rejected"] += 1
        log.error("config reload (%s) rejected, nothing changed: %d problem(s) in %s",
                  trigger, len(problems), self.path)
        for problem in problems:
            log.error("%s", problem)
        return ReloadOutcome("rejected", previous, previous, errors=problems,
                             restart_needed=self.restart_needed)

    def describe(self) -> dict[str, Any]:
        """For /readyz: the running version, and what waits for a restart."""
        out: dict[str, Any] = {"config_version": self.version}
        if self.restart_needed:
            out["restart_needed"] = self.restart_needed
        return out

    def _write_outcome(self, outcome: ReloadOutcome, started: float) -> None:
        """The last outcome, with the ones before it (``control.reload_outcome`` picks the
        one a ``shadowproxy reload`` asked for: a newer one may already have replaced it)."""
        self._written.append({"seq": self._seq, "started": started, **outcome.as_dict()})
        data = {**self._written[-1], "pid": os.getpid(), "earlier": list(self._written)[:-1]}
        try:
            control.write_private(self._run_dir / control.OUTCOME_FILE, json.dumps(data))
        except OSError as exc:
            log.warning("cannot write %s: %s", self._run_dir / control.OUTCOME_FILE, exc)

    # --- watch: true ---
    def start(self) -> None:
        """Start watching the file if the configuration says so."""
        self._update_watch()

    def _update_watch(self) -> None:
        settings = self.settings
        watcher = self._watcher
        if watcher is not None and (not settings.watch
                                    or watcher.interval_s != settings.watch_interval_s):
            self._stop_watch()
            watcher = None
        if settings.watch and watcher is None:
            self._watcher = ConfigWatcher(self.path, self._watched_change,
                                          interval_s=settings.watch_interval_s,
                                          known=self._digest)
            self._watch_task = spawn(self._watcher.run(), name="config-watch")
            log.info("watching %s for changes (every %g s)", self.path,
                     settings.watch_interval_s)

    async def _watched_change(self) -> None:
        # A task of its own: the reload may stop this very watcher (watch: false).
        await asyncio.shield(spawn(self.reload("watch"), name="config-reload"))

    def _stop_watch(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        self._watcher = self._watch_task = None

    async def close(self) -> None:
        """Stop watching; wait for a reload under way; ignore any later one."""
        task = self._watch_task
        self._stop_watch()
        self._cancel_retry()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        async with self._lock:
            self._closed = True
            self._stop_watch()  # in case the reload under way started one
            self._cancel_retry()
