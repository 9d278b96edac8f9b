"""Reloading the configuration while serving: versions, and what can change live.

Every loaded configuration has a ``config_version``: a short hash of its normalized
content, stamped on each recorded request, shown by ``/readyz`` and
``shadowproxy_config_info``. A reload validates the whole new file first; an invalid file
changes nothing. A valid one is applied except for the settings below, which are bound to
resources made once at start-up (a listening socket, the worker processes, the database
connection and its spool, the recorder's queue): those keep their running values until the
next restart, and the reload says so. The version always names what actually runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from shadowproxy.config import Settings

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

    def as_dict(self) -> dict[str, Any]:
        return {"result": self.result, "version": self.version,
                "previous_version": self.previous_version, "errors": self.errors,
                "restart_needed": self.restart_needed}
