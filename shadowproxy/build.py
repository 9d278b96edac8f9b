"""Which build is running: pure Python, or the data path compiled with mypyc.

``setup.py`` compiles ``COMPILED_MODULES`` when ``SHADOWPROXY_COMPILE=1`` (the Docker image
and the benchmark do). The modules are the ones every proxied request and every record runs
through; the rest (configuration, CLI, report, admin) gains nothing from compiling.
Modules left out on purpose: ``recorder.postgres`` (mypyc does not compile async
generators) and ``tasks``.
"""

from __future__ import annotations

import importlib

COMPILED_MODULES = (
    "http1",
    "metrics",
    "mirror",
    "models",
    "primary",
    "proxy",
    "recorder.bodies",
    "recorder.copyrows",
    "recorder.pgtime",
    "recorder.recorder",
    "recorder.rows",
    "replay.call",
    "routing",
    "upstream",
)


def compiled() -> bool:
    """True when the data path runs as compiled extension modules."""
    module = importlib.import_module("shadowproxy.proxy")
    return not (module.__file__ or "").endswith(".py")


def describe() -> str:
    return "compiled with mypyc" if compiled() else "pure Python"
