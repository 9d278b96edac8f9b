"""deploy/kubernetes: the manifests parse; their ports, probes and names agree with the config."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from examples.model_service import parse_args as model_service_args
from shadowproxy.admin import PROBE_PATHS
from shadowproxy.reload import RESTART_ONLY
from tests.deploy.files import (
    ROOT,
    env_name,
    exec_form,
    flag,
    host_port,
    load_yaml,
    load_yaml_all,
    load_yaml_text,
    parse_dockerfile,
    url_host_port,
    write_config,
)

K8S = ROOT / "deploy" / "kubernetes"


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    found = []
    for resource in kustomization["resources"]:
        found += load_yaml_all(K8S / resource)
    return found


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}"
    return matches[0]


def _container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    return containers[name]


def _port(container: dict[str, Any], ref: int | str) -> int:
    """A probe's or Service's port: a number, or the name of a container port."""
    if isinstance(ref, int):
        return ref
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert ref in named, f"container {container['name']} has no port named {ref!r}"
    return int(named[ref])


def _prestop_seconds(container: dict[str, Any]) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    return int(command[1])


@pytest.fixture(scope="module")
def deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(objects, "Deployment", "diabetes-model")


@pytest.fixture(scope="module")
def sidecar(deployment: dict[str, Any]) -> dict[str, Any]:
    return _container(deployment, "shadowproxy")


@pytest.fixture
def settings(objects: list[dict[str, Any]], sidecar: dict[str, Any], tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Any:
    """The ConfigMap's config, loaded with a database URL in the variable the Secret fills."""
    config_path = PurePosixPath(flag(sidecar["args"], "-c"))
    mount = next(m for m in sidecar["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volumes = {v["name"]: v for v in _pod(objects)["volumes"]}
    configmap = _one(objects, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
    text = configmap["data"][config_path.name]
    variable = env_name(load_yaml_text(text)["database"]["url"])
    return write_config(text, tmp_path, {variable: "postgresql://u:p@db:5432/shadowproxy"},
                        monkeypatch)


def _pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = _one(objects, "Deployment", "diabetes-model")["spec"]["template"]["spec"]
    return spec


def test_kustomization_lists_every_manifest(objects: list[dict[str, Any]]) -> None:
    """Every YAML file in deploy/kubernetes is a kustomization resource; every object is named."""
    listed = set(load_yaml(K8S / "kustomization.yaml")["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    for obj in objects:
        assert obj["apiVersion"] and obj["kind"] and obj["metadata"]["name"]


def test_config_map_holds_a_valid_config(settings: Any) -> None:
    """The routes in the ConfigMap pass load_config."""
    assert [r.name for r in settings.routes] == ["diabetes"]


def test_config_map_changes_reach_the_proxy_without_a_restart(
        settings: Any, sidecar: dict[str, Any]) -> None:
    """The config is watched, and mounted as the ConfigMap's folder: a subPath mount would
    never see an update (the kubelet swaps the folder's ..data symlink)."""
    assert settings.watch is True
    config_dir = str(PurePosixPath(flag(sidecar["args"], "-c")).parent)
    mount = next(m for m in sidecar["volumeMounts"] if m["mountPath"] == config_dir)
    assert "subPath" not in mount and "subPathExpr" not in mount


def test_config_map_names_every_setting_that_needs_a_rollout() -> None:
    """The ConfigMap's comment, which says what applies without a restart, names each
    setting a reload keeps at its running value (reload.RESTART_ONLY): an operator who
    edits one there is told to roll the pods out."""
    text = (K8S / "configmap.yaml").read_text()
    comment = " ".join(line.lstrip("# ") for line in text.split("\napiVersion:")[0].splitlines())
    assert "need a rollout" in comment
    unnamed = [path[-1] for path in RESTART_ONLY if not re.search(rf"\b{path[-1]}\b", comment)]
    assert unnamed == []


def test_database_url_comes_from_a_secret(sidecar: dict[str, Any], objects: list[dict[str, Any]],
                                          settings: Any) -> None:
    """The variable the config reads is set on the sidecar from a Secret, never inline."""
    configmap = _one(objects, "ConfigMap", "shadowproxy-config")
    variable = env_name(load_yaml_text(configmap["data"]["config.yaml"])["database"]["url"])
    env = {e["name"]: e for e in sidecar["env"]}
    assert "value" not in env[variable]
    ref = env[variable]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"]
    assert not [o for o in objects if o["kind"] == "Secret"], "do not ship credentials"


def test_readiness_is_readyz_on_admin_listen(sidecar: dict[str, Any], settings: Any) -> None:
    """The sidecar's readiness probe is /readyz, liveness /healthz, both on admin_listen's port."""
    admin_host, admin_port = host_port(settings.admin_listen)
    assert admin_host == "0.0.0.0"
    ready = sidecar["readinessProbe"]["httpGet"]
    live = sidecar["livenessProbe"]["httpGet"]
    assert ready["path"] == "/readyz" and live["path"] == "/healthz"
    assert _port(sidecar, ready["port"]) == _port(sidecar, live["port"]) == admin_port
    for probe in (ready, live):
        assert probe["path"] in PROBE_PATHS, "probes must use paths open without the token"
        assert not probe.get("httpHeaders"), "probes carry no token"


def test_admin_token_comes_from_an_optional_secret(sidecar: dict[str, Any],
                                                   objects: list[dict[str, Any]]) -> None:
    """admin_token is read from a variable that an optional Secret fills: with the Secret
    /metrics needs the token, without it the admin endpoints are open; never inline."""
    configmap = _one(objects, "ConfigMap", "shadowproxy-config")
    raw = load_yaml_text(configmap["data"]["config.yaml"])["admin_token"]
    m = re.fullmatch(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-\}", raw)
    assert m, f"expected ${{VAR:-}} (optional), got {raw!r}"
    env = {e["name"]: e for e in sidecar["env"]}
    ref = env[m.group(1)]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"] and ref["optional"] is True


def test_service_targets_the_proxy_port(objects: list[dict[str, Any]], deployment: dict[str, Any],
                                        sidecar: dict[str, Any], settings: Any) -> None:
    """The Service selects the pods and sends callers to the sidecar's listen port."""
    service = _one(objects, "Service", "diabetes-model")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = service["spec"]["ports"]
    assert len(ports) == 1
    listen_host, listen_port = host_port(settings.listen)
    assert listen_host == "0.0.0.0"
    assert _port(sidecar, ports[0]["targetPort"]) == listen_port


def test_primary_is_the_model_container_in_the_same_pod(deployment: dict[str, Any],
                                                        settings: Any) -> None:
    """The primary URL is loopback, on the port the pod's model container serves."""
    model = _container(deployment, "model")
    host, port = url_host_port(settings.routes[0].primary.url)
    assert host in ("127.0.0.1", "localhost")
    assert model_service_args(model["args"]).port == port
    assert _port(model, "model") == port


def test_shadows_are_services_on_their_model_ports(objects: list[dict[str, Any]],
                                                   settings: Any) -> None:
    """Each shadow URL names a Service whose target container serves on that port."""
    for shadow in settings.routes[0].shadows:
        host, port = url_host_port(shadow.url)
        service = _one(objects, "Service", host)
        by_port = {p["port"]: p for p in service["spec"]["ports"]}
        assert port in by_port, f"Service {host} does not expose {port}"
        backends = [o for o in objects if o["kind"] == "Deployment"
                    and service["spec"]["selector"].items()
                    <= o["spec"]["template"]["metadata"]["labels"].items()]
        assert len(backends) == 1
        container = backends[0]["spec"]["template"]["spec"]["containers"][0]
        target = _port(container, by_port[port]["targetPort"])
        assert model_service_args(container["args"]).port == target


def test_model_outlives_the_proxy_drain(deployment: dict[str, Any], settings: Any) -> None:
    """The model keeps serving until the proxy has drained, and the proxy's whole stop (the
    drain, then the same grace again for the records) ends within the pod's grace period."""
    pod = deployment["spec"]["template"]["spec"]
    proxy_wait = _prestop_seconds(_container(deployment, "shadowproxy"))
    model_wait = _prestop_seconds(_container(deployment, "model"))
    drain = proxy_wait + settings.limits.shutdown_grace_s
    stop = drain + settings.limits.shutdown_grace_s
    assert proxy_wait >= 1, "let endpoint removal spread before the proxy stops accepting"
    assert model_wait > drain
    assert pod["terminationGracePeriodSeconds"] > max(model_wait, stop)


def test_every_container_requests_resources(objects: list[dict[str, Any]]) -> None:
    """Every container requests CPU and memory and caps memory."""
    for spec in _pod_specs(objects):
        for container in spec["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
            assert "memory" in resources["limits"], container["name"]


def test_pods_run_as_the_image_user(objects: list[dict[str, Any]]) -> None:
    """Pods run as non-root with the uid the Dockerfiles create."""
    uids = set()
    for name in ("Dockerfile", "Dockerfile.examples"):
        user = parse_dockerfile(ROOT / "deploy" / name)[1][-1].last("USER")
        assert user is not None
        uids.add(int(user.split(":")[0]))
    for spec in _pod_specs(objects):
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] in uids


def test_spool_and_config_are_mounted(sidecar: dict[str, Any], settings: Any) -> None:
    """data_dir is a writable volume; the config directory is mounted read-only."""
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    assert str(settings.data_dir) in mounts
    assert not mounts[str(settings.data_dir)].get("readOnly", False)
    config_dir = str(PurePosixPath(flag(sidecar["args"], "-c")).parent)
    assert mounts[config_dir]["readOnly"] is True


def _pod_specs(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    specs = [o["spec"]["template"]["spec"] for o in objects if o["kind"] == "Deployment"]
    specs += [o["spec"]["jobTemplate"]["spec"]["template"]["spec"]
              for o in objects if o["kind"] == "CronJob"]
    return specs


def test_images_match_the_compose_build(objects: list[dict[str, Any]]) -> None:
    """The images, with kustomize's tags, are the ones docker-compose.yml builds."""
    tags = {i["name"]: i["newTag"] for i in load_yaml(K8S / "kustomization.yaml")["images"]}
    compose = load_yaml(ROOT / "docker-compose.yml")["services"]
    built = {s["image"] for s in compose.values() if "build" in s}
    for spec in _pod_specs(objects):
        for container in spec["containers"]:
            image = container["image"]
            assert f"{image}:{tags[image]}" in built, image


def test_prune_cronjob_runs_a_valid_prune_on_the_same_config(
        objects: list[dict[str, Any]], sidecar: dict[str, Any]) -> None:
    """The CronJob's command parses as `shadowproxy prune`, on the sidecar's config and Secret."""
    from shadowproxy.cli import build_parser
    from shadowproxy.store.prune import parse_age

    cronjob = _one(objects, "CronJob", "shadowproxy-prune")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    spec = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = spec["containers"][0]
    command = container["command"]
    assert command[0] == "shadowproxy"
    args = build_parser().parse_args(command[1:])
    assert args.command == "prune" and args.batch_size >= 1
    assert parse_age(args.older_than).days >= 1
    assert args.config == flag(sidecar["args"], "-c")
    assert {e["name"]: e["valueFrom"] for e in container["env"]} == {
        e["name"]: e["valueFrom"] for e in sidecar["env"]}
    config_volumes = [v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v]
    assert config_volumes == ["shadowproxy-config"]


def test_prometheus_annotations_point_at_metrics(deployment: dict[str, Any],
                                                 settings: Any) -> None:
    """The pod's scrape annotations name /metrics on admin_listen's port."""
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == host_port(settings.admin_listen)[1]


def test_sidecar_args_are_a_valid_shadowproxy_run(sidecar: dict[str, Any]) -> None:
    """The image's entrypoint plus the sidecar's args parse as `shadowproxy run -c FILE`."""
    from shadowproxy.cli import build_parser

    assert "command" not in sidecar, "keep the image's entrypoint (shadowproxy run)"
    stage = parse_dockerfile(ROOT / "deploy" / "Dockerfile")[1][-1]
    entrypoint = exec_form(stage.last("ENTRYPOINT") or "[]")
    args = build_parser().parse_args(entrypoint[1:] + sidecar["args"])
    assert args.command == "run"
