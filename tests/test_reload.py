"""Config versions and the split between settings that reload live and those that wait."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shadowproxy.config import load_config
from shadowproxy.reload import config_version, describe_changes, effective_settings

BASE = """\
listen: 127.0.0.1:8080
routes:
  - name: r
    primary: {url: "http://127.0.0.1:9001"}
    shadows:
      - {name: s, url: "http://127.0.0.1:9002", sample_rate: 0.5}
"""


def _load(tmp_path: Path, text: str, name: str = "a.yaml"):  # type: ignore[no-untyped-def]
    path = tmp_path / name
    path.write_text(text)
    return load_config(path)


def test_the_version_ignores_formatting_and_spelled_out_defaults(tmp_path: Path) -> None:
    """Reordered keys, comments and a default written out keep the version; a real change
    gives a new one."""
    base = _load(tmp_path, BASE)
    same = _load(tmp_path, "# the same, reformatted\n" + BASE.replace(
        "sample_rate: 0.5}", "sample_rate: 0.50, timeout_s: 30}"), "b.yaml")
    other = _load(tmp_path, BASE.replace("0.5", "0.25"), "c.yaml")
    assert config_version(base) == config_version(same)
    assert config_version(base) != config_version(other)
    assert len(config_version(base)) == 12


def test_restart_only_settings_keep_their_running_values(tmp_path: Path) -> None:
    """A reload that changes `listen` applies its routes but keeps the running listener, and
    says so."""
    running = _load(tmp_path, BASE)
    new = _load(tmp_path, BASE.replace("8080", "8081").replace("0.5", "1.0"), "b.yaml")
    applied, pinned = effective_settings(running, new)
    assert applied.listen == "127.0.0.1:8080"
    assert applied.routes[0].shadows[0].sample_rate == 1.0
    assert len(pinned) == 1 and pinned[0].startswith("listen: changed in the file")


def test_live_settings_pass_through_unchanged(tmp_path: Path) -> None:
    """A reload of live settings only returns the new settings as they are."""
    running = _load(tmp_path, BASE)
    new = _load(tmp_path, BASE.replace("0.5", "0.0"), "b.yaml")
    applied, pinned = effective_settings(running, new)
    assert applied is new and pinned == []


def test_settings_handed_to_workers_as_json_keep_their_version(tmp_path: Path) -> None:
    """The configuration a supervisor writes for its workers as JSON reads back with the
    same version (compare settings included)."""
    import json

    from shadowproxy.config import Settings

    settings = _load(tmp_path, BASE + """\
    compare: {prediction: "$.prediction", task: regression, abs_tolerance: 0.1,
              features: {age: {path: "$.features.age", type: numeric, min: 0, max: 120}}}
""")
    again = Settings.model_validate(json.loads(json.dumps(settings.model_dump(mode="json"))))
    assert config_version(again) == config_version(settings)


def test_a_change_of_any_route_setting_is_named(tmp_path: Path) -> None:
    """The outcome of a reload names each route setting it changes, retry_non_idempotent
    included."""
    running = _load(tmp_path, BASE)
    new = _load(tmp_path, BASE.replace("  - name: r\n",
                                       "  - name: r\n    retry_non_idempotent: true\n"), "b.yaml")
    assert describe_changes(running, new) == ["route r: retry_non_idempotent changed"]


async def test_a_reload_that_cannot_be_applied_is_rejected_and_changes_nothing(
        tmp_path: Path) -> None:
    """Applying a valid file can still fail (a supervisor cannot write its workers' file on
    a full disk): the reload is rejected, saying why, the running version stays, and the
    next reload applies. The apply step is the Reloader's seam; here it fails once."""
    from shadowproxy.metrics import Metrics
    from shadowproxy.reload import Reloader

    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    running = load_config(path)
    metrics = Metrics()
    failures = [OSError(28, "No space left on device")]

    async def apply(settings: object, version: str) -> None:
        if failures:
            raise failures.pop()

    reloader = Reloader(path, running, apply, metrics, tmp_path / "run")
    path.write_text(BASE.replace("0.5", "0.25"))
    first = await reloader.reload("test")
    assert (first.result, first.version) == ("rejected", config_version(running))
    assert first.errors == [
        f"{path}: version {config_version(load_config(path))} could not be applied "
        f"(OSError: [Errno 28] No space left on device); version {first.version} keeps running"]
    assert reloader.version == config_version(running)
    second = await reloader.reload("test")
    assert (second.result, second.previous_version) == ("applied", config_version(running))
    assert metrics.reloads == {"applied": 1, "rejected": 1}


async def test_a_reload_loads_the_content_it_tells_the_watcher_of(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file read for the watcher and the file loaded are one read: a file rewritten in
    place with the same content (a tool applying it again) while a reload reads it is
    loaded as the watcher saw it. Read twice, the load caught it half-written and was
    rejected while the watcher counted the whole content as loaded, and never offered it
    again: the proxy kept the old configuration for good. The rewrite is made at the moment
    of the load, through the loader the reload calls."""
    import asyncio

    from shadowproxy import reload as reload_module
    from shadowproxy.metrics import Metrics
    from shadowproxy.reload import Reloader

    path = tmp_path / "c.yaml"
    watched = BASE + "watch: true\nwatch_interval_s: 0.05\n"
    path.write_text(watched)
    running = load_config(path)
    edited = watched.replace("0.5", "0.25")
    real = reload_module.load_config

    def rewritten_meanwhile(*args: Any, **kwargs: Any) -> Any:
        path.write_text(edited[:len(edited) // 2])  # truncated, half written again...
        try:
            return real(*args, **kwargs)
        finally:
            path.write_text(edited)  # ... and whole, as the watcher read it

    async def apply(settings: object, version: str) -> None:
        return None

    monkeypatch.setattr(reload_module, "load_config", rewritten_meanwhile)
    reloader = Reloader(path, running, apply, Metrics(), tmp_path / "run")
    reloader.start()
    try:
        path.write_text(edited)
        for _ in range(100):
            await asyncio.sleep(0.02)
            if reloader.version != config_version(running):
                break
        await asyncio.sleep(0.3)  # the watcher polls on
    finally:
        await reloader.close()
    assert reloader.version == config_version(real(path))


def test_a_reload_that_reorders_routes_says_so(tmp_path: Path) -> None:
    """Among routes of one path_prefix the first in the file that admits the method takes the
    request: a reload that only reorders them changes where requests go, and says so (it
    said nothing but the new version)."""
    routes = {
        "a": "  - name: a\n    match: {methods: [POST]}\n"
             "    primary: {url: \"http://127.0.0.1:9001\"}\n",
        "b": "  - name: b\n    primary: {url: \"http://127.0.0.1:9002\"}\n",
        "c": "  - name: c\n    match: {path_prefix: /c}\n"
             "    primary: {url: \"http://127.0.0.1:9003\"}\n"}
    running = _load(tmp_path, "routes:\n" + routes["a"] + routes["b"])
    new = _load(tmp_path, "routes:\n" + routes["b"] + routes["a"], "b.yaml")
    assert describe_changes(running, new) == ["route order changed: b, a"]
    added = _load(tmp_path, "routes:\n" + routes["c"] + routes["a"] + routes["b"], "c.yaml")
    assert describe_changes(running, added) == ["route c: added"]


def test_routes_added_and_removed_are_named_in_order(tmp_path: Path) -> None:
    """Routes a reload adds or removes are named sorted by name, so that the log line and
    the outcome's ``changes`` read the same for the same reload (they came in the order of
    a set of strings, which differs from one process to the next)."""
    def routes(names: list[str]) -> str:
        return "routes:\n" + "".join(
            f"  - name: {n}\n    match: {{path_prefix: /{n}}}\n"
            f"    primary: {{url: \"http://127.0.0.1:9001\"}}\n" for n in names)

    names = [f"r{i:02d}" for i in range(20)]
    running = _load(tmp_path, routes(names[:10]))
    new = _load(tmp_path, routes(names[10:][::-1]), "b.yaml")
    assert describe_changes(running, new) == (
        [f"route {n}: added" for n in names[10:]]
        + [f"route {n}: removed" for n in names[:10]])
