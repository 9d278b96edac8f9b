"""What ``shadowproxy report`` needs beyond the proxy's install, and a clear word when missing.

numpy and scipy compute every report and rich prints it; rapidfuzz compares the texts of a
generation route (which a route may turn out to be only once its answers are read, so it is
checked for every report); matplotlib draws the HTML report's
plots; pyarrow reads a Parquet reference (a CSV reference needs nothing more). They come with
the ``report`` extra. The command checks what this report needs before it reads anything,
so that a missing package is an error naming the extra (exit status 1), not a traceback
halfway.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

from shadowproxy.errors import MissingExtraError

INSTALL = "pip install 'shadowproxy[report]'"
REPORT = ("numpy", "scipy", "rich", "rapidfuzz")


def is_parquet(path: Path) -> bool:
    """Whether a reference file is read as Parquet (with pyarrow) rather than CSV."""
    return path.suffix.lower() in (".parquet", ".pq")


def require(modules: Sequence[str], what: str) -> None:
    """MissingExtraError naming the modules of ``modules`` that cannot be imported, and
    the extra."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            missing.append(f"{name} ({exc})")
    if missing:
        raise MissingExtraError(f"{what} needs {', '.join(missing)}; it comes with the "
                                f"report extra: {INSTALL}")


def require_for(fmt: str, reference: Path | None) -> None:
    """Everything a report in format ``fmt`` with this ``reference`` file imports."""
    require(REPORT, "shadowproxy report")
    if fmt == "html":
        require(("matplotlib",), "--format html (its plots)")
    if reference is not None and is_parquet(reference):
        require(("pyarrow",), f"--reference {reference} (a Parquet file)")
