"""Optional compiled build of the data path (everything else lives in pyproject.toml).

``SHADOWPROXY_COMPILE=1 pip install .`` compiles the modules every proxied request runs
through with mypyc (the compiler mypy ships): the same, type-checked Python source becomes
C extension modules, with the same behaviour and about a quarter less CPU per request (see
docs/performance.md). The Docker image and ``bench/`` use it. A plain
``pip install`` (and every editable install, where a stale compiled module would hide edits
to its source) stays pure Python. The list of modules is ``COMPILED_MODULES`` in
``shadowproxy/build.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

COMPILE = os.environ.get("SHADOWPROXY_COMPILE", "") == "1"


def _compiled_modules() -> list[str]:
    # build.py is read, not imported: importing the package would need its dependencies,
    # which are not in the build environment.
    namespace: dict[str, object] = {}
    source = Path(__file__).with_name("shadowproxy") / "build.py"
    exec(compile(source.read_text(), str(source), "exec"), namespace)
    modules = namespace["COMPILED_MODULES"]
    assert isinstance(modules, tuple)
    return [f"shadowproxy/{name.replace('.', '/')}.py" for name in modules]


def _ext_modules() -> list[object]:
    if not COMPILE:
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        # First pass of an isolated build: setup_requires below makes pip install mypy into
        # the build environment, then runs this file again.
        if "egg_info" in sys.argv or "dist_info" in sys.argv:
            return []
        raise SystemExit("SHADOWPROXY_COMPILE=1 needs mypy (which provides mypyc) in the "
                         "build environment: pip install 'mypy>=1.10', or build with pip's "
                         "default build isolation") from None
    # An isolated build environment has none of the dependencies installed, so some
    # "type: ignore" comments the type check needs look unused there: not an error here.
    options = ["--no-warn-unused-ignores"]
    return mypycify(options + _compiled_modules(), opt_level="3",
                    group_name="shadowproxy_native")


def _dependencies() -> list[str]:
    """The package's dependencies (pyproject.toml), for the build environment of a compiled
    build: mypyc type-checks the compiled modules against the types of pydantic, orjson,
    aiohttp and the rest, and pip's isolated build environment holds only what this build
    asks for. Without them the check sees those modules as Any and fails ("Class cannot
    subclass BaseModel") in a virtualenv that has nothing installed yet, as the Docker
    image's; only an invoking virtualenv that has them hides that, since mypy also searches
    its site-packages."""
    import tomllib

    project = tomllib.loads(Path(__file__).with_name("pyproject.toml").read_text())["project"]
    dependencies = project["dependencies"]
    assert isinstance(dependencies, list)
    return [str(d) for d in dependencies]


setup(
    ext_modules=_ext_modules(),
    setup_requires=["mypy>=1.10", *_dependencies()] if COMPILE else [],
)
