"""deploy/k8s as `kubectl kustomize` renders it, validated offline against Kubernetes'
schemas (kubernetes-validate --strict), and holding to what running meshtoll needs."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from meshtoll.policy import load_policy
from meshtoll.settings import Settings, settings_from

ROOT = Path(__file__).parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33"
KUSTOMIZATIONS = ["base", "overlays/in-cluster-redis", "overlays/gateway-sidecar"]


def kustomize(directory: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is missing: scripts/test installs it (apt-get install kubernetes-client)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def by_kind(documents: list[dict[str, Any]], kind: str, name: str = "meshtoll") -> dict[str, Any]:
    (found,) = [item for item in documents if item["kind"] == kind and item["metadata"]["name"] == name]
    return found


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return kustomize("base")


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_every_rendered_object_is_valid_kubernetes(directory: str) -> None:
    documents = kustomize(directory)
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    assert {item["metadata"].get("namespace", "meshtoll") for item in documents} == {"meshtoll"}


def test_a_misspelt_field_would_be_caught(base: list[dict[str, Any]]) -> None:
    deployment = copy.deepcopy(by_kind(base, "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_deployment_runs_replicated_non_root_read_only_with_probes(base: list[dict[str, Any]]) -> None:
    spec = by_kind(base, "Deployment")["spec"]
    assert spec["replicas"] >= 2
    pod = spec["template"]["spec"]
    assert pod["affinity"]["podAntiAffinity"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] is security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]


def test_the_policy_is_mounted_as_a_directory_so_updates_reload(
    base: list[dict[str, Any]], tmp_path: Path
) -> None:
    pod = by_kind(base, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (mount,) = [item for item in container["volumeMounts"] if item["name"] == "policy"]
    # subPath would pin the first version: Kubernetes updates a ConfigMap volume by swapping
    # the directory's symlink, which a subPath mount never sees.
    assert "subPath" not in mount
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["MESHTOLL_POLICY"] == mount["mountPath"] + "/policy.yaml"
    (volume,) = [item for item in pod["volumes"] if item["name"] == "policy"]
    config_map = by_kind(base, "ConfigMap", volume["configMap"]["name"])
    # A fixed name (no hash suffix): an edit updates the mounted file instead of a restart.
    assert config_map["metadata"]["name"] == "meshtoll-policy"
    path = tmp_path / "policy.yaml"
    path.write_text(config_map["data"]["policy.yaml"])
    assert not load_policy(path).tenants  # a starter that loads and lets nobody in


def test_the_environment_is_what_meshtoll_serve_reads(base: list[dict[str, Any]]) -> None:
    (container,) = by_kind(base, "Deployment")["spec"]["template"]["spec"]["containers"]
    plain = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    secret = {item["name"] for item in container["env"] if "valueFrom" in item}
    assert secret == {"MESHTOLL_REDIS_URL", "MESHTOLL_ADMIN_TOKEN"}
    settings = settings_from({}, plain)
    ports = {item["name"]: item["containerPort"] for item in container["ports"]}
    assert (settings.grpc_port, settings.http_authz_port, settings.admin_port) == (
        ports["grpc"],
        ports["http-authz"],
        ports["admin"],
    )
    assert settings.host == Settings().host == "0.0.0.0"


def test_the_service_declares_the_grpc_port_as_grpc(base: list[dict[str, Any]]) -> None:
    # On gateways istiod enables HTTP/2 to a Service port only when it is declared gRPC.
    ports = {item["name"]: item for item in by_kind(base, "Service")["spec"]["ports"]}
    assert ports["grpc"]["appProtocol"] == "grpc"
    assert ports["http-authz"]["appProtocol"] == "http"


def test_autoscaling_and_disruption_budget_keep_a_replica(base: list[dict[str, Any]]) -> None:
    assert by_kind(base, "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2
    assert by_kind(base, "PodDisruptionBudget")["spec"]["minAvailable"] >= 1


def test_the_redis_overlay_points_meshtoll_at_its_redis() -> None:
    documents = kustomize("overlays/in-cluster-redis")
    secret = by_kind(documents, "Secret")
    redis = by_kind(documents, "Service", "redis")
    assert secret["data"]["redis-url"]  # base64 of redis://redis.meshtoll.svc.cluster.local:6379/0
    assert redis["spec"]["ports"][0]["port"] == 6379
    only_meshtoll = by_kind(documents, "NetworkPolicy", "redis")
    assert only_meshtoll["spec"]["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "meshtoll"}}}
    ]


def test_the_example_secret_is_valid_and_holds_the_keys_the_deployment_reads(
    base: list[dict[str, Any]],
) -> None:
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    kubernetes_validate.validate(secret, KUBERNETES_VERSION, strict=True)
    (container,) = by_kind(base, "Deployment")["spec"]["template"]["spec"]["containers"]
    keys = {item["valueFrom"]["secretKeyRef"]["key"] for item in container["env"] if "valueFrom" in item}
    assert keys == set(secret["stringData"])


def test_the_sidecar_gateway_reaches_meshtoll_only_through_its_unix_sockets() -> None:
    documents = kustomize("overlays/gateway-sidecar")
    pod = by_kind(documents, "Deployment", "meshtoll-gateway")["spec"]["template"]["spec"]
    containers = {item["name"]: item for item in pod["containers"]}
    envoy, meshtoll = containers["envoy"], containers["meshtoll"]
    env = {item["name"]: item.get("value") for item in meshtoll["env"]}
    (sockets,) = [item["mountPath"] for item in meshtoll["volumeMounts"] if item["name"] == "sockets"]
    assert env["MESHTOLL_UDS_DIR"] == sockets
    assert [item["mountPath"] for item in envoy["volumeMounts"] if item["name"] == "sockets"] == [sockets]
    # TCP on loopback only: probes run inside the container, decisions come over the sockets.
    assert env["MESHTOLL_HOST"] == "127.0.0.1"
    assert "ports" not in meshtoll
    # One uid for both: the sockets meshtoll creates are its owner's to connect to.
    assert envoy["securityContext"]["runAsUser"] == meshtoll["securityContext"]["runAsUser"]
    (config_volume,) = [item for item in pod["volumes"] if item["name"] == "envoy-config"]
    bootstrap = yaml.safe_load(
        by_kind(documents, "ConfigMap", config_volume["configMap"]["name"])["data"]["envoy.yaml"]
    )
    pipes = {
        cluster["name"]: cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
            "pipe"
        ]["path"]
        for cluster in bootstrap["static_resources"]["clusters"]
        if cluster["name"].startswith("meshtoll_")
    }
    assert pipes == {"meshtoll_http": f"{sockets}/authz.sock", "meshtoll_grpc": f"{sockets}/grpc.sock"}
    # The client's own address reaches Envoy and so meshtoll's IP allow-lists.
    assert by_kind(documents, "Service", "meshtoll-gateway")["spec"]["externalTrafficPolicy"] == "Local"
