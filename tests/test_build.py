"""The build in use is the one this test run was asked for (pure Python or compiled).

CI runs the suite twice: on the editable install (pure Python) and on a tree compiled with
``tools/compiled-tree.sh`` under ``SHADOWPROXY_EXPECT_COMPILED=1``. These checks make sure
the second run really exercised the compiled modules, all of them, and not a mix.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

from shadowproxy import build

EXPECT_COMPILED = os.environ.get("SHADOWPROXY_EXPECT_COMPILED") == "1"


def test_the_build_in_use_is_the_one_expected() -> None:
    assert build.compiled() is EXPECT_COMPILED
    for name in build.COMPILED_MODULES:
        module = importlib.import_module(f"shadowproxy.{name}")
        is_extension = not (module.__file__ or "").endswith(".py")
        assert is_extension is EXPECT_COMPILED, f"shadowproxy.{name}: {module.__file__}"


def test_every_compiled_module_has_its_source() -> None:
    package = Path(build.__file__).parent
    for name in build.COMPILED_MODULES:
        assert (package / (name.replace(".", "/") + ".py")).is_file(), name


def test_version_says_which_build_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "shadowproxy", "--version"],
                         capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(build.__file__).parent.parent)
    expected = "compiled with mypyc" if EXPECT_COMPILED else "pure Python"
    assert out.stdout.startswith("shadowproxy ") and f"({expected})" in out.stdout
