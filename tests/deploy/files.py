"""Readers for the deployment files, for the static checks of tests/deploy.

There is no Docker engine or Kubernetes cluster on the test machines, so the compose file,
the Dockerfiles and the manifests are parsed and cross-checked instead of run.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parents[2]

# The metric names and labels the dashboard is built on (the public interface:
# docs/operations.md, "Metrics"). Histograms also expose _bucket (with `le`), _sum and _count.
CONTRACT_METRICS: dict[str, frozenset[str]] = {
    "shadowproxy_requests_total": frozenset({"route", "code"}),
    "shadowproxy_upstream_latency_seconds": frozenset({"route", "target"}),
    "shadowproxy_shadow_requests_total": frozenset({"route", "shadow", "outcome"}),
    "shadowproxy_records_total": frozenset({"outcome"}),
    "shadowproxy_recorder_queue_records": frozenset(),
}
CONTRACT_HISTOGRAMS = frozenset({"shadowproxy_upstream_latency_seconds"})
CONTRACT_LABEL_VALUES: dict[tuple[str, str], frozenset[str]] = {
    ("shadowproxy_shadow_requests_total", "outcome"):
        frozenset({"ok", "timeout", "connect", "reset", "closed", "protocol", "dropped",
                   "skipped", "shutdown"}),
    ("shadowproxy_records_total", "outcome"): frozenset({"written", "spooled", "dropped"}),
}


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_yaml_text(text: str) -> Any:
    return yaml.safe_load(text)


def load_yaml_all(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def load_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


_COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def compose_interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR}`` / ``${VAR:-default}`` substitution, with an empty environment."""
    env = env or {}

    def replace(m: re.Match[str]) -> str:
        if m.group(1) in env:
            return env[m.group(1)]
        if m.group(2) is None:
            raise AssertionError(f"{value!r}: ${{{m.group(1)}}} has no default in compose")
        return m.group(2)

    return _COMPOSE_VAR.sub(replace, value)


def host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host, int(port)


def url_host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None, url
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def flag(args: list[str], name: str) -> str:
    """The value after ``name`` in an argument list (``--port 9001``)."""
    assert name in args, f"{name} not in {args}"
    return args[args.index(name) + 1]


def write_config(text: str, tmp_path: Path, env: dict[str, str],
                 monkeypatch: Any) -> Any:
    """``load_config`` on ``text`` with the environment the deployment gives the proxy."""
    from shadowproxy.config import load_config

    # The real override variable of the developer's shell must not leak into the check.
    monkeypatch.delenv("SHADOWPROXY_DATABASE_URL", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


@dataclass
class Stage:
    """One ``FROM`` stage of a Dockerfile: its base, name and instructions in order."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages of a Dockerfile (continuations joined)."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comments inside a continued instruction are dropped by Docker too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path}: the last instruction ends with a continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name))
        elif not stages:
            assert keyword == "ARG", f"{path}: only ARG may come before the first FROM"
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form ENTRYPOINT/CMD; shell form is refused."""
    value = json.loads(args)
    assert isinstance(value, list), f"expected the exec form [..], got {args!r}"
    return [str(v) for v in value]


def copy_sources(args: str) -> list[str]:
    """The source paths of a COPY instruction from the build context (not --from)."""
    words = shlex.split(args)
    if any(w.startswith("--from=") for w in words):
        return []
    words = [w for w in words if not w.startswith("--")]
    return words[:-1]


def dockerignore_allows(path: Path, source: str) -> bool:
    """Whether an allowlist-style .dockerignore (``*`` then ``!path``) sends ``source``."""
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0] == "*", f"{path}: expected an allowlist starting with '*'"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    return source.rstrip("/").removeprefix("./") in allowed


def env_name(value: str) -> str:
    """``${VAR}`` → ``VAR`` (the variable a config value reads from the environment)."""
    m = re.fullmatch(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", value)
    assert m, f"expected a bare ${{VAR}} reference, got {value!r}"
    return m.group(1)
