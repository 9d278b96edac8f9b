"""The directories and files shadowproxy keeps under ``data_dir``: its user's alone.

The spool holds the recorded requests and answers as pickles, ``data_dir/run`` the
configuration handed to workers and their pickled snapshots. Readable by others, they leak
the records; writable by others (a process started with umask 000, as some container
images and init systems run them), anyone on the host could plant a pickle that the proxy
loads, running their code as the proxy's user. So they are created mode 0700 and 0600
whatever the umask.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600


def private_directory(path: Path) -> None:
    """Create ``path``, and ``data_dir`` above it when missing, mode 0700. A ``path`` that
    exists open to others (made by an earlier version) is narrowed to 0700: it holds
    shadowproxy's files only. ``data_dir`` itself, when it exists, is the operator's (a
    volume, a directory shared with a group) and is left as it is. OSError if it cannot
    be created."""
    path.parent.mkdir(DIRECTORY_MODE, parents=True, exist_ok=True)
    path.mkdir(DIRECTORY_MODE, exist_ok=True)
    with contextlib.suppress(OSError):  # not ours to change: writing to it fails clearly
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(DIRECTORY_MODE)


def open_private(path: Path, flags: int) -> int:
    """``os.open(path, flags | O_CREAT)`` creating the file mode 0600, whatever the umask."""
    return os.open(path, flags | os.O_CREAT, FILE_MODE)
