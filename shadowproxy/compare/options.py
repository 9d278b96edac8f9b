"""The report's sampling options, ``--max-pairs`` and ``--seed``: defaults and checks.

No numpy or database here: the CLI shows the defaults in its help and the command checks the
values before anything heavy is imported, so that a bad value is answered at once.
"""

from __future__ import annotations

from shadowproxy.errors import UsageError

DEFAULT_MAX_PAIRS = 50_000
"""The largest window reported on whole; above it, a sample of this many requests. A
report over this many pairs takes a few seconds on two cores (docs/performance.md)."""

DEFAULT_SEED = 20240601
"""The seed of the sample and of the tests' resampling, when ``--seed`` is not given."""

_MIN_SEED, _MAX_SEED = -(2 ** 63), 2 ** 63 - 1


def max_pairs(text: str) -> int:
    """``--max-pairs``: a positive whole number (``100000`` or ``100_000``); UsageError."""
    try:
        value = int(text.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"--max-pairs: expected a positive whole number of pairs such as "
                         f"{DEFAULT_MAX_PAIRS} (got {text!r}); a window with more pairs is "
                         "reported from a sample of that many requests")
    return value


def seed(text: str) -> int:
    """``--seed``: a whole number that fits PostgreSQL's 64-bit hash seed; UsageError."""
    try:
        value: int | None = int(text.strip())
    except ValueError:
        value = None
    if value is None or not _MIN_SEED <= value <= _MAX_SEED:
        raise UsageError(f"--seed: expected a whole number such as {DEFAULT_SEED} "
                         f"(got {text!r}); the same seed draws the same sample")
    return value
