"""deploy/k8s/overlays: the base with an in-cluster Redis, and the gateway-sidecar shape
(Envoy and meshtoll in one pod over Unix sockets) applied instead of the base."""

from __future__ import annotations

from pathlib import PurePosixPath

from meshtoll.render.container import POLICY_DIR, READY_CHECK, REDIS_IMAGE
from meshtoll.render.documents import yaml_file
from meshtoll.render.envoy import LISTENERS, sidecar_bootstrap
from meshtoll.render.k8s_objects import (
    LABELS,
    NAME,
    NON_ROOT_UID,
    POLICY_CONFIG_MAP,
    SECRET,
    SELECTOR,
    STARTER_POLICY,
    meshtoll_env,
    metadata,
    namespace_object,
    redis_url,
    security_context,
)
from meshtoll.render.params import DeployParams
from meshtoll.settings import Settings


def redis_overlay(params: DeployParams) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "redis", "app.kubernetes.io/part-of": NAME}
    selector = {"app.kubernetes.io/name": "redis"}
    redis = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata("redis", params, labels),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {"fsGroup": 999},
                    "containers": [
                        {
                            "name": "redis",
                            "image": REDIS_IMAGE,
                            "args": ["--appendonly", "yes", "--dir", "/data"],
                            "ports": [{"name": "redis", "containerPort": 6379, "protocol": "TCP"}],
                            "readinessProbe": {
                                "exec": {"command": ["redis-cli", "ping"]},
                                "periodSeconds": 5,
                            },
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "128Mi"},
                                "limits": {"memory": "512Mi"},
                            },
                            "securityContext": {**security_context(), "runAsUser": 999, "runAsGroup": 999},
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                        }
                    ],
                    "volumes": [{"name": "data", "emptyDir": {}}],
                },
            },
        },
    }
    redis_service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata("redis", params, labels),
        "spec": {
            "selector": selector,
            "ports": [{"name": "tcp-redis", "port": 6379, "targetPort": "redis", "appProtocol": "redis"}],
        },
    }
    only_meshtoll = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata("redis", params, labels),
        "spec": {
            "podSelector": {"matchLabels": selector},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": dict(SELECTOR)}}],
                    "ports": [{"protocol": "TCP", "port": 6379}],
                }
            ],
        },
    }
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": params.namespace,
        "resources": ["../../base", "redis.yaml"],
        "secretGenerator": [
            {
                "name": SECRET,
                "literals": [f"redis-url={redis_url(params)}"],
                "options": {"disableNameSuffixHash": True, "labels": dict(LABELS)},
            }
        ],
    }
    return {
        "overlays/in-cluster-redis/kustomization.yaml": yaml_file(
            """
The base plus a single in-cluster Redis and the Secret that points meshtoll at it (no
admin token: /api/* answers loopback clients only until you add one). For trying meshtoll
out: the Redis keeps usage and billing data on an emptyDir, which a rescheduled pod loses.
In production, point the base's Secret at a Redis you run with persistence or a replica.
""",
            kustomization,
        ),
        "overlays/in-cluster-redis/redis.yaml": yaml_file(
            "One Redis for meshtoll's counters and usage ledger, reachable by meshtoll's pods only.",
            redis,
            redis_service,
            only_meshtoll,
        ),
    }


SOCKETS = PurePosixPath("/run/meshtoll")
GATEWAY = "meshtoll-gateway"


def sidecar_overlay(params: DeployParams) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": GATEWAY, "app.kubernetes.io/part-of": NAME}
    selector = {"app.kubernetes.io/name": GATEWAY}
    ports = {
        "http": params.listen_port + LISTENERS["full"],
        "grpc-authz": params.listen_port + LISTENERS["grpc_authz"],
    }
    envoy = {
        "name": "envoy",
        "image": params.envoy_image,
        # No hot restart: it needs shared memory, and Kubernetes replaces pods instead.
        "command": ["envoy", "-c", "/etc/envoy/envoy.yaml", "--disable-hot-restart", "--log-level", "warn"],
        "ports": [{"name": name, "containerPort": port, "protocol": "TCP"} for name, port in ports.items()],
        "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 5},
        "resources": {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        # meshtoll's uid: the sockets meshtoll creates are its owner's to connect to.
        "securityContext": security_context(),
        "volumeMounts": [
            {"name": "envoy-config", "mountPath": "/etc/envoy", "readOnly": True},
            {"name": "sockets", "mountPath": str(SOCKETS)},
        ],
    }
    # Loopback TCP (the probes run inside the container), the decisions over the sockets:
    # nothing outside the pod reaches meshtoll.
    environment = [
        {"name": Settings.env_name("policy"), "value": f"{POLICY_DIR}/policy.yaml"},
        {"name": Settings.env_name("host"), "value": "127.0.0.1"},
        {"name": Settings.env_name("uds_dir"), "value": str(SOCKETS)},
        *[item for item in meshtoll_env(params) if "valueFrom" in item],
    ]
    probe = ["python", "-c", READY_CHECK]
    meshtoll = {
        "name": NAME,
        "image": params.image,
        "args": ["serve"],
        "env": environment,
        "readinessProbe": {"exec": {"command": probe}, "periodSeconds": 5, "timeoutSeconds": 3},
        "livenessProbe": {
            "exec": {"command": probe},
            "periodSeconds": 10,
            "timeoutSeconds": 3,
            "failureThreshold": 6,
        },
        "resources": {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": security_context(),
        "volumeMounts": [
            {"name": "policy", "mountPath": POLICY_DIR, "readOnly": True},
            {"name": "sockets", "mountPath": str(SOCKETS)},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    gateway = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(GATEWAY, params, labels),
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {"fsGroup": NON_ROOT_UID},
                    "containers": [envoy, meshtoll],
                    "volumes": [
                        {"name": "envoy-config", "configMap": {"name": f"{GATEWAY}-envoy"}},
                        {"name": "policy", "configMap": {"name": POLICY_CONFIG_MAP}},
                        {"name": "sockets", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(GATEWAY, params, labels),
        "spec": {
            "type": "LoadBalancer",
            # The client's own address reaches Envoy (use_remote_address) and so meshtoll's
            # IP allow-lists; Cluster would show a node's address instead.
            "externalTrafficPolicy": "Local",
            "selector": selector,
            "ports": [
                {"name": name, "port": port, "targetPort": name, "appProtocol": "http"}
                for name, port in ports.items()
            ],
        },
    }
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": params.namespace,
        "resources": ["namespace.yaml", "gateway.yaml"],
        "configMapGenerator": [
            # A hash suffix: a new Envoy configuration rolls the gateway's pods.
            {"name": f"{GATEWAY}-envoy", "files": ["envoy.yaml"], "options": {"labels": dict(labels)}},
            {
                "name": POLICY_CONFIG_MAP,
                "files": ["policy.yaml"],
                "options": {"disableNameSuffixHash": True, "labels": dict(LABELS)},
            },
        ],
    }
    root = "overlays/gateway-sidecar"
    return {
        f"{root}/kustomization.yaml": yaml_file(SIDECAR_COMMENT, kustomization),
        f"{root}/namespace.yaml": yaml_file("meshtoll's own namespace.", namespace_object(params)),
        f"{root}/gateway.yaml": yaml_file(
            "The gateway: Envoy and meshtoll in one pod, talking over Unix sockets.", gateway, service
        ),
        f"{root}/envoy.yaml": sidecar_bootstrap(params, SOCKETS),
        f"{root}/policy.yaml": STARTER_POLICY,
    }


SIDECAR_COMMENT = f"""
For Kubernetes without Istio: a gateway of its own, each pod an Envoy with meshtoll as its
sidecar. Envoy reaches meshtoll over Unix sockets in a shared in-memory volume
({SOCKETS}, `meshtoll serve --uds-dir`): no network hop, no port another pod could
reach, so no NetworkPolicy is needed for meshtoll. Applied instead of the base (not with
it); it reads the same Secret `{SECRET}`. Render it for your upstream:
  meshtoll render k8s --upstream-host my-app.my-namespace.svc.cluster.local --upstream-port 80
"""
