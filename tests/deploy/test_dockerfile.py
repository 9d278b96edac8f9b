"""deploy/Dockerfile and deploy/Dockerfile.examples, checked statically (no Docker engine here)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.deploy.files import (
    ROOT,
    Stage,
    copy_sources,
    dockerignore_allows,
    exec_form,
    flag,
    host_port,
    load_yaml,
    parse_dockerfile,
)

DOCKERFILES = [ROOT / "deploy" / "Dockerfile", ROOT / "deploy" / "Dockerfile.examples"]
BUILD_TOOLS = re.compile(
    r"\b(apt-get|apt|apk|yum|dnf)\b.*\binstall\b|\b(gcc|build-essential|make)\b")


def _final(path: Path) -> Stage:
    return parse_dockerfile(path)[1][-1]


def _user_uid(stage: Stage) -> int:
    user = stage.last("USER")
    assert user is not None, "the image must set USER"
    uid = user.split(":")[0]
    assert uid.isdigit(), f"USER should be numeric so runAsNonRoot can check it (got {user!r})"
    return int(uid)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_is_multi_stage_on_a_slim_pinned_python(path: Path) -> None:
    """The final stage starts from a clean python:*-slim; no stage uses an unpinned tag."""
    _, stages = parse_dockerfile(path)
    assert len(stages) >= 2, "build in one stage, copy the result into a clean one"
    for stage in stages:
        assert ":" in stage.base and not stage.base.endswith(":latest"), stage.base
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", stages[-1].base), stages[-1].base


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_as_a_non_root_user_it_creates(path: Path) -> None:
    """USER is a numeric, non-zero uid, created in the final stage."""
    stage = _final(path)
    uid = _user_uid(stage)
    assert uid != 0
    assert any(f"--uid {uid}" in run for run in stage.all("RUN")), "create the user"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_installs_nothing(path: Path) -> None:
    """No package manager, compiler or pip install runs in the final stage."""
    for run in _final(path).all("RUN"):
        assert not BUILD_TOOLS.search(run), run
        assert "pip install" not in run, run
    copies_from_build = [c for c in _final(path).all("COPY") if c.startswith("--from=")]
    assert copies_from_build, "the final stage should copy its environment from the build stage"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_exist_and_pass_the_dockerignore(path: Path) -> None:
    """Every COPY source exists and is let through by <Dockerfile>.dockerignore."""
    ignore = path.with_name(path.name + ".dockerignore")
    assert ignore.is_file(), f"{ignore} keeps .venv and data out of the build context"
    sources = [s for stage in parse_dockerfile(path)[1] for c in stage.all("COPY")
               for s in copy_sources(c)]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert dockerignore_allows(ignore, source), f"{source} is excluded by {ignore.name}"


def test_proxy_image_entrypoint_is_shadowproxy_run() -> None:
    """The proxy image runs `shadowproxy run -c <config>` by default."""
    stage = _final(DOCKERFILES[0])
    entrypoint = stage.last("ENTRYPOINT")
    cmd = stage.last("CMD")
    assert entrypoint is not None and cmd is not None
    assert exec_form(entrypoint) == ["shadowproxy", "run"]
    assert flag(exec_form(cmd), "-c").endswith(".yaml")


def test_proxy_image_exposes_the_configured_ports_and_data_dir() -> None:
    """EXPOSE and the data volume match the compose config's listen, admin_listen, data_dir."""
    stage = _final(DOCKERFILES[0])
    config = load_yaml(ROOT / "config" / "docker-compose.yaml")
    exposed = {int(p) for e in stage.all("EXPOSE") for p in e.split()}
    assert exposed == {host_port(config["listen"])[1], host_port(config["admin_listen"])[1]}
    assert stage.last("WORKDIR") == config["data_dir"]
    assert exec_form(stage.last("VOLUME") or "[]") == [config["data_dir"]]
    assert any(f"-o {_user_uid(stage)}" in r and config["data_dir"] in r
               for r in stage.all("RUN")), "data_dir must belong to the image's user"


def test_proxy_image_installs_the_package_with_its_migrations() -> None:
    """The build stage copies pyproject.toml and the package and installs it (not editable)."""
    build = parse_dockerfile(DOCKERFILES[0])[1][0]
    sources = {s for c in build.all("COPY") for s in copy_sources(c)}
    assert {"pyproject.toml", "setup.py", "README.md", "shadowproxy"} <= sources
    installs = [r for r in build.all("RUN") if "pip install" in r]
    assert installs and all(" -e " not in r for r in installs)


def test_proxy_image_compiles_the_data_path_by_default() -> None:
    """SHADOWPROXY_COMPILE defaults to 1 in the build stage, which also has a C compiler."""
    stages = parse_dockerfile(DOCKERFILES[0])[1]
    build = stages[0]
    assert any(a.startswith("SHADOWPROXY_COMPILE=1") for a in build.all("ARG"))
    assert any("SHADOWPROXY_COMPILE=${SHADOWPROXY_COMPILE}" in e for e in build.all("ENV"))
    assert any("apt-get install" in r and " gcc" in r for r in build.all("RUN"))
    runtime = stages[-1]
    assert not any("gcc" in r for r in runtime.all("RUN")), "no compiler in the final image"


def test_the_image_compiled_build_gets_the_dependencies_it_type_checks_against() -> None:
    """The image builds the compiled package in an empty virtualenv, with pip's build
    isolation: the build environment holds only what setup.py asks for, and mypyc's type
    check of the data path needs the dependencies' types (pydantic, orjson, ...). Asked the
    way pip asks it first (mypy not yet there), a compiled build wants every dependency."""
    code = ("import sys\n"
            "sys.modules['mypyc'] = sys.modules['mypyc.build'] = None  # pip's first pass\n"
            "from setuptools.build_meta import get_requires_for_build_wheel\n"
            "print('\\n'.join(get_requires_for_build_wheel()))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "SHADOWPROXY_COMPILE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    wanted = set(done.stdout.split("\n"))
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"]
    assert set(dependencies) <= wanted, f"not in the build environment: " \
        f"{sorted(set(dependencies) - wanted)}"
    assert any(r.startswith("mypy") for r in wanted)
    build = parse_dockerfile(DOCKERFILES[0])[1][0]
    installs = [r for r in build.all("RUN") if "pip install" in r]
    assert all("--no-build-isolation" not in r for r in installs)


def _third_party_imports(folder: Path) -> set[str]:
    found = set()
    for file in folder.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != folder.name}


DISTRIBUTIONS = {"sklearn": "scikit-learn"}


def test_examples_image_installs_what_the_examples_import() -> None:
    """Every third-party module examples/ imports is installed, with pyproject's lower bounds."""
    build = parse_dockerfile(DOCKERFILES[1])[1][0]
    specs = dict(re.findall(r'"([A-Za-z0-9_.-]+)(>=[^"]+)"', " ".join(build.all("RUN"))))
    for module in _third_party_imports(ROOT / "examples"):
        assert DISTRIBUTIONS.get(module, module) in specs, f"{module} is not installed"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = pyproject["dependencies"] + [
        r for extra in pyproject["optional-dependencies"].values() for r in extra]
    bounds: dict[str, str] = {}
    for requirement in declared:
        m = re.match(r"([A-Za-z0-9_.-]+)(>=[^;,\s]+)", requirement)
        if m:
            bounds[m.group(1)] = m.group(2)
    for name, spec in specs.items():
        assert bounds.get(name) == spec, f"{name}{spec} disagrees with pyproject.toml"


def test_examples_image_runs_the_model_service() -> None:
    """The examples image's entrypoint is the example model service module."""
    stage = _final(DOCKERFILES[1])
    entrypoint = exec_form(stage.last("ENTRYPOINT") or "[]")
    assert entrypoint == ["python", "-m", "examples.model_service"]
    assert (ROOT / "examples" / "model_service.py").is_file()


def test_proxy_image_default_command_parses() -> None:
    """`docker run shadowproxy` with no arguments is a valid `shadowproxy run -c FILE`."""
    from shadowproxy.cli import build_parser

    stage = _final(DOCKERFILES[0])
    argv = exec_form(stage.last("ENTRYPOINT") or "[]")[1:] + exec_form(stage.last("CMD") or "[]")
    args = build_parser().parse_args(argv)
    assert (args.command, args.config) == ("run", "/etc/shadowproxy/config.yaml")
