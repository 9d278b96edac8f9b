"""Running Python in a real subprocess where some packages cannot be imported.

As on an install without the ``report`` extra: an import hook installed before anything
else makes ``import numpy`` (and its submodules) raise ``ModuleNotFoundError``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_BLOCK = """
import sys


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""

CLI = "from shadowproxy.cli import main\nraise SystemExit(main(sys.argv[1:]))\n"


def run_without(blocked: Sequence[str], code: str, *args: str, timeout: float = 90
                ) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with ``args`` in a fresh interpreter where ``blocked`` are missing."""
    program = f"BLOCKED = {set(blocked)!r}\n{_BLOCK}\n{code}"
    return subprocess.run([sys.executable, "-c", program, *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
