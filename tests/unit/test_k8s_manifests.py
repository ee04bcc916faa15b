"""The Kubernetes manifests in deploy/k8s: valid for the API server, and
consistent with the gateway's contract and with each other.

- Every built-in resource is validated offline against the Kubernetes JSON
  schemas that kubernetes-validate ships, in strict mode (an unknown or
  misspelled field fails), for :data:`KUBERNETES_VERSION`.
- CRD resources (ServiceMonitor, ScaledObject) have no schema there; they get
  a structural check of the fields their CRDs require.
- The gateway config the ConfigMap is generated from passes
  ``llmproxy check-config`` with the environment the pod would get.
- Probes, ports, grace periods, selectors and the discovery name line up.

``kubectl kustomize`` (kustomize built into kubectl) renders the whole
kustomization when kubectl is installed; without it, the configMapGenerator
is checked by reading kustomization.yaml.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmproxy.config import load_config
from llmproxy.config.schema import Config, DiscoveryConfig
from llmproxy.discovery.dns import DEFAULT_JITTER

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
#: The oldest Kubernetes the manifests promise to work with.
KUBERNETES_VERSION = "1.30"
#: CoreDNS's default TTL for Service records, in seconds.
DNS_TTL_S = 5
KUSTOMIZATION = "kustomization.yaml"
GATEWAY_CONFIG = "gateway.yaml"
GATEWAY_CONTAINER = "llmproxy"
VLLM_CONTAINER = "vllm"

#: ``(apiVersion, kind)`` of CRD resources -> dotted paths their CRD requires
#: (or that are meaningless without). kubernetes-validate has no schema for them.
CRD_REQUIRED: dict[tuple[str, str], tuple[str, ...]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("metadata.name", "spec.selector"),
    ("keda.sh/v1alpha1", "ScaledObject"): (
        "metadata.name",
        "spec.scaleTargetRef.name",
        "spec.triggers",
    ),
}


# -- loading -----------------------------------------------------------------------


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def kustomization() -> dict[str, Any]:
    (doc,) = load_docs(K8S / KUSTOMIZATION)
    return doc


def generator_files(entry: dict[str, Any]) -> dict[str, str]:
    """A configMapGenerator entry's ``files``: ConfigMap key -> file path."""
    files: dict[str, str] = {}
    for item in entry.get("files", []):
        key, _, path = item.rpartition("=")
        files[key or Path(path).name] = path
    return files


def manifest_paths() -> list[Path]:
    """Every YAML file in deploy/k8s that is a Kubernetes resource."""
    not_resources = {KUSTOMIZATION, GATEWAY_CONFIG}
    return sorted(p for p in K8S.glob("*.yaml") if p.name not in not_resources)


def all_resources() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in manifest_paths():
        for doc in load_docs(path):
            yield f"{path.name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}", doc


RESOURCES = dict(all_resources())


def find(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        doc
        for doc in RESOURCES.values()
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    (found,) = (c for c in containers if c["name"] == name)
    return found


def dig(doc: dict[str, Any], dotted: str) -> Any:
    value: Any = doc
    for part in dotted.split("."):
        assert isinstance(value, dict), f"{dotted}: {part!r} is not inside a mapping"
        assert part in value, f"{dotted}: missing {part!r}"
        value = value[part]
    return value


def port_number(cont: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    (number,) = (p["containerPort"] for p in cont["ports"] if p["name"] == port)
    return int(number)


def pre_stop_sleep_s(cont: dict[str, Any]) -> int:
    """Seconds the preStop hook waits: ``exec: sleep N`` or the native ``sleep``."""
    pre_stop = dig(cont, "lifecycle.preStop")
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] in ("sleep", "/bin/sleep", "/usr/bin/sleep"), command
    return int(command[1])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


# -- schema validation -------------------------------------------------------------


def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate as kv  # type: ignore[import-untyped]
    except ImportError:
        pytest.fail(
            "kubernetes-validate is not installed; it ships the Kubernetes JSON schemas so "
            "the manifests are validated offline: pip install -e '.[test]'"
        )
    return kv


def validate(doc: dict[str, Any]) -> None:
    kv = kubernetes_validate()
    try:
        kv.validate(doc, KUBERNETES_VERSION, strict=True)
    except kv.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path) or "(top)"
        pytest.fail(f"Kubernetes {KUBERNETES_VERSION} schema: {where}: {exc.message}")
    except kv.SchemaNotFoundError as exc:
        pytest.fail(f"{exc.message} (a CRD? then list it in CRD_REQUIRED)")


def check_structure(doc: dict[str, Any]) -> None:
    for dotted in CRD_REQUIRED[(doc["apiVersion"], doc["kind"])]:
        assert dig(doc, dotted), f"{dotted} must not be empty"


@pytest.mark.parametrize("ident", sorted(RESOURCES))
def test_resource_is_valid(ident: str) -> None:
    doc = RESOURCES[ident]
    if (doc.get("apiVersion"), doc.get("kind")) in CRD_REQUIRED:
        check_structure(doc)
    else:
        validate(doc)


def test_strict_validation_catches_a_misspelled_field() -> None:
    """The validator really runs strict: a typo is an error, not ignored."""
    doc = find("Service", "llmproxy")
    broken = {**doc, "spec": {**doc["spec"], "selecter": doc["spec"]["selector"]}}
    kv = kubernetes_validate()
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_and_its_files_exist() -> None:
    kz = kustomization()
    assert kz["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kz["kind"] == "Kustomization"
    resources = set(kz["resources"])
    for name in resources:
        assert (K8S / name).is_file(), f"resources: {name} does not exist"
    examples = {p.name for p in manifest_paths() if p.name.endswith(".example.yaml")}
    unlisted = {p.name for p in manifest_paths()} - resources - examples
    assert not unlisted, f"manifests not in kustomization.yaml resources: {sorted(unlisted)}"
    # The example Secret holds placeholders: never applied by accident.
    assert not resources & examples


def test_config_map_generator_builds_the_mounted_gateway_config() -> None:
    (entry,) = kustomization()["configMapGenerator"]
    files = generator_files(entry)
    for path in files.values():
        assert (K8S / path).is_file(), f"configMapGenerator: {path} does not exist"
    deployment = find("Deployment", "llmproxy")
    spec = deployment["spec"]["template"]["spec"]
    (volume,) = (v for v in spec["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == entry["name"]
    (mount,) = (
        m
        for m in container(deployment, GATEWAY_CONTAINER)["volumeMounts"]
        if m["name"] == volume["name"]
    )
    args = container(deployment, GATEWAY_CONTAINER)["args"]
    config_path = args[args.index("--config") + 1]
    assert Path(config_path).parent == Path(mount["mountPath"])
    assert files[Path(config_path).name] == GATEWAY_CONFIG


def test_kustomize_build_renders_valid_resources() -> None:
    """The full render, generated ConfigMap and namespace included (needs kubectl)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; the kustomization was checked by reading it")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    namespace = kustomization()["namespace"]
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_REQUIRED:
            check_structure(doc)
        else:
            validate(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]
    (config_map,) = (d for d in docs if d["kind"] == "ConfigMap")
    assert config_map["data"][GATEWAY_CONFIG] == (K8S / GATEWAY_CONFIG).read_text("utf-8")
    (gateway,) = (
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "llmproxy"
    )
    volumes = gateway["spec"]["template"]["spec"]["volumes"]
    assert config_map["metadata"]["name"] in [v.get("configMap", {}).get("name") for v in volumes]


# -- the gateway config in the ConfigMap ----------------------------------------------


def pod_environment(deployment: dict[str, Any], name: str) -> dict[str, str]:
    """The variables the container gets, with Secret values from the example Secret."""
    secrets = {
        doc["metadata"]["name"]: doc.get("stringData", {})
        for doc in RESOURCES.values()
        if doc["kind"] == "Secret"
    }
    env: dict[str, str] = {}
    for var in container(deployment, name).get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        data = secrets.get(ref["name"], {})
        if ref["key"] in data:
            env[var["name"]] = str(data[ref["key"]])
        else:
            assert ref.get("optional"), f"{var['name']}: no key {ref['key']} in {ref['name']}"
    return env


def check_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``llmproxy check-config PATH`` with only ``env`` (and PATH, HOME) set:
    no variable of the test run leaks in."""
    base = {k: os.environ[k] for k in ("PATH", "HOME", "SYSTEMROOT") if k in os.environ}
    return subprocess.run(
        [sys.executable, "-m", "llmproxy", "check-config", str(path)],
        cwd=ROOT,
        env={**base, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_gateway_config_passes_check_config_with_the_pod_environment() -> None:
    env = pod_environment(find("Deployment", "llmproxy"), GATEWAY_CONTAINER)
    assert "LLMPROXY_ADMIN_TOKEN" in env
    result = check_config(K8S / GATEWAY_CONFIG, env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gateway_config_fails_check_config_without_the_admin_token() -> None:
    """The check above proves something: the Secret really is needed."""
    result = check_config(K8S / GATEWAY_CONFIG, {})
    assert result.returncode == 1
    assert "LLMPROXY_ADMIN_TOKEN" in result.stderr


def loaded_config() -> Config:
    """The gateway config as the gateway reads it, in the pod's environment."""
    env = pod_environment(find("Deployment", "llmproxy"), GATEWAY_CONTAINER)
    return load_config(K8S / GATEWAY_CONFIG, env=env)


def discovery_configs() -> dict[str, DiscoveryConfig]:
    return {
        name: pool.discovery
        for name, pool in loaded_config().pools.items()
        if pool.discovery is not None
    }


def test_discovery_points_at_the_headless_service_of_the_replicas() -> None:
    namespace = kustomization()["namespace"]
    discovered = discovery_configs()
    assert discovered, "the example's pools come from DNS discovery"
    for cfg in discovered.values():
        service_name, ns, rest = cfg.dns.split(".", 2)
        assert (ns, rest) == (namespace, "svc.cluster.local"), cfg.dns
        service = find("Service", service_name)
        assert service["spec"]["clusterIP"] == "None", "discovery needs a headless Service"
        assert not service["spec"].get("publishNotReadyAddresses", False)
        (replicas,) = (
            d
            for d in RESOURCES.values()
            if d["kind"] == "Deployment" and selects(service["spec"]["selector"], pod_labels(d))
        )
        vllm = container(replicas, VLLM_CONTAINER)
        (port,) = service["spec"]["ports"]
        assert port["port"] == cfg.port
        assert port_number(vllm, port["targetPort"]) == cfg.port
        args = vllm["args"]
        assert args[args.index("--port") + 1] == str(cfg.port)


# -- the gateway Deployment -----------------------------------------------------------


def test_gateway_grace_period_covers_pre_stop_and_drain() -> None:
    deployment = find("Deployment", "llmproxy")
    drain_s = loaded_config().server.drain_timeout_s
    pre_stop_s = pre_stop_sleep_s(container(deployment, GATEWAY_CONTAINER))
    assert pre_stop_s >= 3, "give endpoints time to drop the pod before SIGTERM"
    grace_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_s > drain_s + pre_stop_s


def test_gateway_probes_and_ports_follow_the_contract() -> None:
    deployment = find("Deployment", "llmproxy")
    cont = container(deployment, GATEWAY_CONTAINER)
    config = loaded_config()
    server_port, admin_port = config.server.port, config.admin.port
    assert (server_port, admin_port) == (8080, 8081)
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = cont[probe]["httpGet"]
        assert get["path"] == path, probe
        assert port_number(cont, get["port"]) == server_port, probe
    assert sorted(p["containerPort"] for p in cont["ports"]) == [server_port, admin_port]
    service = find("Service", "llmproxy")
    assert selects(service["spec"]["selector"], pod_labels(deployment))
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert port_number(cont, by_name["http"]["targetPort"]) == server_port
    assert port_number(cont, by_name["admin"]["targetPort"]) == admin_port


def test_gateway_runs_replicated_and_spread() -> None:
    deployment = find("Deployment", "llmproxy")
    labels = pod_labels(deployment)
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (term,) = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert selects(term["podAffinityTerm"]["labelSelector"]["matchLabels"], labels)
    pdb = find("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    hpa = find("HorizontalPodAutoscaler", "llmproxy")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "llmproxy")
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_gateway_runs_as_the_image_user_on_a_read_only_root() -> None:
    deployment = find("Deployment", "llmproxy")
    pod = deployment["spec"]["template"]["spec"]
    cont = container(deployment, GATEWAY_CONTAINER)
    security = {**pod["securityContext"], **cont["securityContext"]}
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^USER 10001$", dockerfile, re.M), "the image's uid changed"
    assert pod["automountServiceAccountToken"] is False
    # The config is ${VAR}-interpolated: no Service-link variables may leak in.
    assert pod["enableServiceLinks"] is False


@pytest.mark.parametrize(
    ("deployment", "name"), [("llmproxy", "llmproxy"), ("vllm-llama-8b", "vllm")]
)
def test_containers_set_requests_and_limits(deployment: str, name: str) -> None:
    resources = container(find("Deployment", deployment), name)["resources"]
    for side in ("requests", "limits"):
        assert {"cpu", "memory"} <= resources[side].keys(), side


def test_service_monitor_scrapes_the_admin_metrics() -> None:
    monitor = find("ServiceMonitor")
    service = find("Service", "llmproxy")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    (port,) = (p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
    cont = container(find("Deployment", "llmproxy"), GATEWAY_CONTAINER)
    assert port_number(cont, port["targetPort"]) == loaded_config().admin.port


# -- the replica side -------------------------------------------------------------------


def test_vllm_replicas_have_a_gpu_and_a_health_probe() -> None:
    deployment = find("Deployment", "vllm-llama-8b")
    cont = container(deployment, VLLM_CONTAINER)
    assert cont["image"].startswith("vllm/vllm-openai:")
    assert "--model" in cont["args"]
    assert cont["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = cont[probe]["httpGet"]
        assert (get["path"], port_number(cont, get["port"])) == ("/health", 8000), probe
    assert deployment["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_a_leaving_replica_serves_until_every_gateway_has_noticed() -> None:
    """DNS drops a terminating pod at once, but each gateway only sees it at its
    next lookup; the replica must not stop before then."""
    deployment = find("Deployment", "vllm-llama-8b")
    pre_stop_s = pre_stop_sleep_s(container(deployment, VLLM_CONTAINER))
    for cfg in discovery_configs().values():
        assert pre_stop_s > DNS_TTL_S + cfg.refresh_s * (1 + DEFAULT_JITTER)
    grace_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_s > pre_stop_s


def test_replica_autoscaler_uses_the_gateway_saturation_metric() -> None:
    scaled = find("ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    replicas = find("Deployment", target["name"])
    assert scaled["spec"]["minReplicaCount"] >= 1
    assert scaled["spec"]["maxReplicaCount"] > scaled["spec"]["minReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger.get("metricType", "AverageValue") == "AverageValue"
    assert float(trigger["metadata"]["threshold"]) == 1.0, "the metric is a replica count"
    query = trigger["metadata"]["query"]
    assert "llmproxy_pool_desired_replicas" in query
    (pool,) = re.findall(r'pool="([^"]+)"', query)
    assert f'namespace="{kustomization()["namespace"]}"' in query
    # The pool in the query is the one whose discovery finds these replicas.
    dns = discovery_configs()[pool].dns
    service = find("Service", dns.split(".")[0])
    assert selects(service["spec"]["selector"], pod_labels(replicas))


def test_example_secret_is_marked_as_placeholders() -> None:
    secret = find("Secret", "llmproxy-secrets")
    text = (K8S / "secret.example.yaml").read_text(encoding="utf-8")
    assert "EXAMPLE ONLY" in text
    assert "CHANGE-ME" in secret["stringData"]["admin-token"]
    for key, value in secret["stringData"].items():
        if key.startswith("api-key-sha256-"):
            assert re.fullmatch(r"[0-9a-f]{64}", value), key
