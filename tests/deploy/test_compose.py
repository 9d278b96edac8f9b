"""docker-compose.yml, checked statically: files, ports, URLs and the mounted proxy config agree."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from examples.model_service import parse_args as model_service_args
from shadowproxy.admin import PROBE_PATHS
from shadowproxy.cli import build_parser
from tests.deploy.files import (
    ROOT,
    compose_interpolate,
    env_name,
    exec_form,
    flag,
    host_port,
    load_yaml,
    parse_dockerfile,
    url_host_port,
    write_config,
)

COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "write environment as a mapping"
    return {k: compose_interpolate(str(v)) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out.append((source, target))
    return out


def _config_path(service: dict[str, Any]) -> str:
    return flag(service["command"], "-c")


def _proxy_config_source(services: dict[str, dict[str, Any]]) -> Path:
    proxy = services["shadowproxy"]
    target = _config_path(proxy)
    sources = [s for s, t in _mounts(proxy) if t == target]
    assert len(sources) == 1, f"expected one volume mounted at {target}"
    return ROOT / sources[0]


@pytest.fixture
def proxy_settings(services: dict[str, dict[str, Any]], tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> Any:
    """The mounted config, loaded with the environment compose gives the proxy."""
    source = _proxy_config_source(services)
    return write_config(source.read_text(), tmp_path, _environment(services["shadowproxy"]),
                        monkeypatch)


def _healthcheck_url(service: dict[str, Any]) -> str:
    test = " ".join(service["healthcheck"]["test"])
    m = re.search(r"https?://[^'\" ]+", test)
    assert m, f"no URL in the healthcheck {test!r}"
    return m.group(0)


def test_the_four_services_exist_and_postgres_is_the_official_image(
        services: dict[str, dict[str, Any]]) -> None:
    """The compose file runs PostgreSQL (official image), both models and the proxy."""
    assert {"postgres", "primary", "candidate", "shadowproxy"} <= set(services)
    image = services["postgres"]["image"]
    assert re.fullmatch(r"postgres:\d+[\w.-]*", image), image


def test_every_referenced_file_exists(services: dict[str, dict[str, Any]]) -> None:
    """Build contexts, Dockerfiles and bind-mounted files are all in the repository."""
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = ROOT / build["context"]
            assert context.is_dir(), f"{name}: build context {context}"
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']}"
        for source, _ in _mounts(service):
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: mounts missing {source}"


def test_proxy_config_is_mounted_from_config_and_valid(
        services: dict[str, dict[str, Any]], proxy_settings: Any) -> None:
    """The proxy reads config/docker-compose.yaml, which load_config accepts as is."""
    assert _proxy_config_source(services) == ROOT / "config" / "docker-compose.yaml"
    assert proxy_settings.routes


def test_database_url_comes_from_the_environment_and_names_postgres(
        services: dict[str, dict[str, Any]], proxy_settings: Any) -> None:
    """The config reads the URL from the environment; it points at the postgres service."""
    raw = load_yaml(_proxy_config_source(services))["database"]["url"]
    variable = env_name(raw)
    env = _environment(services["shadowproxy"])
    assert variable in env
    url = urlsplit(proxy_settings.database.url)
    pg_env = _environment(services["postgres"])
    assert url.hostname == "postgres" and (url.port or 5432) == 5432
    assert url.username == pg_env["POSTGRES_USER"]
    assert url.password == pg_env["POSTGRES_PASSWORD"]
    assert url.path == "/" + pg_env["POSTGRES_DB"]


def test_proxy_ports_are_published_and_match_the_config(
        services: dict[str, dict[str, Any]], proxy_settings: Any) -> None:
    """listen and admin_listen bind all interfaces, and their ports are the published ones."""
    published = {}
    for mapping in services["shadowproxy"]["ports"]:
        *_, host, container = mapping.split(":")
        published[int(container)] = int(host)
    listen_host, listen_port = host_port(proxy_settings.listen)
    admin_host, admin_port = host_port(proxy_settings.admin_listen)
    assert listen_host == admin_host == "0.0.0.0"
    assert published[listen_port] == listen_port
    assert admin_port in published


def test_routes_name_compose_services_on_their_ports(
        services: dict[str, dict[str, Any]], proxy_settings: Any) -> None:
    """Every primary and shadow URL is a compose service listening on that port."""
    urls = [r.primary.url for r in proxy_settings.routes]
    urls += [s.url for r in proxy_settings.routes for s in r.shadows]
    for url in urls:
        host, port = url_host_port(url)
        assert host in services, f"{url}: no compose service {host!r}"
        args = model_service_args(services[host]["command"])
        assert (args.port, args.host) == (port, "0.0.0.0"), url


def test_model_commands_are_valid_for_the_example_service(
        services: dict[str, dict[str, Any]]) -> None:
    """The model services run examples.model_service with arguments it accepts: two models."""
    models = {model_service_args(services[n]["command"]).model for n in ("primary", "candidate")}
    assert models == {"linear", "gbm"}


def test_healthchecks_probe_pg_isready_and_healthz(
        services: dict[str, dict[str, Any]], proxy_settings: Any) -> None:
    """PostgreSQL is checked with pg_isready, the proxy and models on their /healthz ports."""
    pg = services["postgres"]["healthcheck"]["test"]
    pg_env = _environment(services["postgres"])
    assert "pg_isready" in pg
    assert flag(pg, "-U") == pg_env["POSTGRES_USER"]
    assert flag(pg, "-d") == pg_env["POSTGRES_DB"]
    url = urlsplit(_healthcheck_url(services["shadowproxy"]))
    assert url.path == "/healthz"
    assert url.port == host_port(proxy_settings.admin_listen)[1]
    assert url.path in PROBE_PATHS, "the healthcheck must use a path open without the token"
    assert "Authorization" not in " ".join(services["shadowproxy"]["healthcheck"]["test"])
    for name in ("primary", "candidate"):
        url = urlsplit(_healthcheck_url(services[name]))
        assert url.path == "/healthz"
        assert url.port == model_service_args(services[name]["command"]).port


def test_admin_token_is_optional_from_the_environment(
        services: dict[str, dict[str, Any]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """admin_token comes from SHADOWPROXY_ADMIN_TOKEN when set (then /metrics needs it) and
    is off when it is not; the healthcheck's path stays open either way."""
    source = _proxy_config_source(services)
    raw = load_yaml(source)["admin_token"]
    m = re.fullmatch(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-\}", raw)
    assert m, f"expected ${{VAR:-}} (optional), got {raw!r}"
    proxy = services["shadowproxy"]
    assert proxy["environment"][m.group(1)] == f"${{{m.group(1)}:-}}"
    env = _environment(proxy)
    assert write_config(source.read_text(), tmp_path, env, monkeypatch).admin_token is None
    env[m.group(1)] = "s3cret"
    assert write_config(source.read_text(), tmp_path, env, monkeypatch).admin_token == "s3cret"


def test_proxy_starts_after_healthy_dependencies(services: dict[str, dict[str, Any]]) -> None:
    """The proxy waits for PostgreSQL and both models to be healthy."""
    depends = services["shadowproxy"]["depends_on"]
    for name in ("postgres", "primary", "candidate"):
        assert depends[name]["condition"] == "service_healthy"


def test_spool_lives_on_a_named_volume(compose: dict[str, Any],
                                       services: dict[str, dict[str, Any]],
                                       proxy_settings: Any) -> None:
    """data_dir (the spool) is a named volume, so spooled records survive a restart."""
    mounts = dict((t, s) for s, t in _mounts(services["shadowproxy"]))
    source = mounts.get(str(proxy_settings.data_dir))
    assert source is not None, f"nothing mounted at data_dir {proxy_settings.data_dir}"
    assert source in compose["volumes"]


def test_prometheus_scrapes_the_proxy_admin_port(services: dict[str, dict[str, Any]],
                                                 proxy_settings: Any) -> None:
    """deploy/prometheus.yml targets the shadowproxy service on admin_listen's port."""
    mounts = dict((t, s) for s, t in _mounts(services["prometheus"]))
    prom = load_yaml(ROOT / mounts["/etc/prometheus/prometheus.yml"])
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]
    admin_port = host_port(proxy_settings.admin_listen)[1]
    assert targets == [f"shadowproxy:{admin_port}"]
    assert prom["scrape_configs"][0]["metrics_path"] == "/metrics"


def test_grafana_provisioning_loads_the_dashboard_from_prometheus(
        services: dict[str, dict[str, Any]]) -> None:
    """Grafana's provisioning points at the mounted dashboard and the compose Prometheus."""
    mounts = dict((t, s) for s, t in _mounts(services["grafana"]))
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    providers = load_yaml(provisioning / "dashboards" / "shadowproxy.yaml")["providers"]
    folder = providers[0]["options"]["path"]
    dashboards = {t for t in mounts if t.startswith(folder + "/")}
    assert dashboards == {f"{folder}/shadowproxy.json"}
    assert mounts[f"{folder}/shadowproxy.json"] == "./deploy/grafana/shadowproxy.json"
    source = load_yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"][0]
    assert source["type"] == "prometheus"
    assert url_host_port(source["url"]) == ("prometheus", 9090)


def test_proxy_command_is_a_valid_shadowproxy_run(services: dict[str, dict[str, Any]]) -> None:
    """The image's entrypoint plus the compose command parse as `shadowproxy run -c FILE`."""
    proxy = services["shadowproxy"]
    stage = parse_dockerfile(ROOT / proxy["build"]["context"] / proxy["build"]["dockerfile"])[1][-1]
    entrypoint = exec_form(stage.last("ENTRYPOINT") or "[]")
    assert entrypoint[0] == "shadowproxy"
    args = build_parser().parse_args(entrypoint[1:] + proxy["command"])
    assert args.command == "run"
    assert args.config == _config_path(proxy)


def test_the_compose_image_can_run_the_report_it_documents(
        services: dict[str, dict[str, Any]]) -> None:
    """The image installs no extra by default; compose, whose comments run `shadowproxy
    report` in the container, builds it with the report extra that pyproject.toml defines."""
    import tomllib

    proxy = services["shadowproxy"]
    stage = parse_dockerfile(ROOT / proxy["build"]["context"] / proxy["build"]["dockerfile"])[1][0]
    assert {'EXTRAS=""', "EXTRAS="} & set(stage.all("ARG")), "the image installs no extra"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert proxy["build"]["args"]["EXTRAS"] == "report" and "report" in extras
    assert "shadowproxy report" in COMPOSE.read_text()
