"""Noticing that the configuration file changed (``watch: true``), by polling its content.

Event-based file watching misses the two ways a deployed configuration usually changes: a
Kubernetes ConfigMap update swaps the ``..data`` symlink of the mounted folder to a new
folder (the file the proxy opened is never written), and an editor or ``kubectl cp`` on a
bind-mounted file rewrites it in place, which watchers on the host's side of the mount do not
always see (traefik/traefik#5589). Reading the file through its path on every poll sees
both: the path is resolved anew each time, and the content itself is compared.

A change is reported once the new content has been the same for two polls in a row, so that a
file caught half-written is not offered for a reload (and rejected) on the way. An empty file
is taken for one being rewritten (an in-place edit truncates it first, and a busy machine can
leave it empty for longer than a poll): it is never a configuration, so it is not reported.
A file that stays unreadable (removed, a ConfigMap key renamed) or empty for two polls in a
row is said in the log once, and so is its return: the running configuration stays.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger("shadowproxy")


def read_content(path: Path) -> bytes | None:
    """The file's bytes, or None when it cannot be read right now."""
    try:
        return path.read_bytes()
    except OSError:
        return None  # mid-swap or removed for a moment: look again at the next poll


def digest_of(data: bytes | None) -> str | None:
    """SHA-256 of ``data``; None for a file not read, or empty."""
    return hashlib.sha256(data).hexdigest() if data else None


def _poll(path: Path) -> tuple[bytes | None, str | None]:
    """The file's bytes, or None and why there are none to load (for the log)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    if not data:
        return None, "is empty (taken for a file being rewritten)"
    return data, None


def content_digest(path: Path) -> str | None:
    """SHA-256 of the file's bytes, or None when it cannot be read right now (or is empty)."""
    return digest_of(read_content(path))


class ConfigWatcher:
    """Calls ``on_change`` when the file at ``path`` settles on new content."""

    def __init__(self, path: Path, on_change: Callable[[], Awaitable[object]], *,
                 interval_s: float = 1.0, known: str | None = None) -> None:
        self.path = path
        self.interval_s = interval_s
        self._on_change = on_change
        self._known = known if known is not None else content_digest(path)
        """The content the running configuration was loaded from."""

    def loaded(self, digest: str | None) -> None:
        """The file was (re)loaded by another trigger, with content ``digest`` (of the bytes
        loaded, so that an edit made meanwhile is still seen)."""
        self._known = digest

    async def run(self) -> None:
        """Poll until cancelled."""
        candidate: str | None = None
        missing: str | None = None
        """Why the file held no configuration at the last poll (unreadable, or empty)."""
        said = warned = False
        while True:
            await asyncio.sleep(self.interval_s)
            data, why = _poll(self.path)
            if data is None:
                # Said once it lasts for two polls: a ConfigMap swap or an editor's rename
                # leaves no file for a moment. Unsaid, a file removed, or emptied by a
                # failed write, left the proxy on its last configuration with nothing in
                # the log to say that the file no longer counted.
                if why != missing:
                    missing, said = why, False
                elif not said:
                    log.warning("config file %s %s: the running configuration stays; the "
                                "file is read again every %g s", self.path, why,
                                self.interval_s)
                    said = warned = True
                candidate = None
                continue
            if warned:
                log.info("config file %s can be read again", self.path)
            missing, said, warned = None, False, False
            digest = digest_of(data)
            if digest == self._known:
                candidate = None
                continue
            if digest != candidate:
                candidate = digest  # new content: wait one poll for it to settle
                continue
            self._known = digest
            candidate = None
            log.info("config file %s changed: reloading", self.path)
            await self._on_change()
