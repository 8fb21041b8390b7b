"""deploy/k8s: meshtoll in Kubernetes as a kustomize base and overlays.

base/                       Deployment, Service, policy ConfigMap, HPA, PDB, NetworkPolicy
overlays/in-cluster-redis/  plus a single Redis and the Secret that points meshtoll at it
overlays/gateway-sidecar/   instead: an Envoy gateway pod with meshtoll as its sidecar,
                            over Unix sockets (for Kubernetes without Istio)
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from meshtoll.render.container import POLICY_DIR, READY_CHECK, REDIS_IMAGE
from meshtoll.render.documents import yaml_file
from meshtoll.render.envoy import LISTENERS, sidecar_bootstrap
from meshtoll.render.params import DeployParams
from meshtoll.settings import Settings

NAME = "meshtoll"
SELECTOR = {"app.kubernetes.io/name": NAME}
LABELS = {**SELECTOR, "app.kubernetes.io/part-of": NAME}
SECRET = NAME  # keys: redis-url, admin-token
_NON_ROOT_UID = 10001  # the image's USER (Dockerfile)

STARTER_POLICY = """\
# The policy meshtoll serves, mounted as a directory at /etc/meshtoll/policy (no subPath):
# Kubernetes swaps the directory's symlink on a ConfigMap update and meshtoll reloads
# within a second; a version that does not load is logged and the last good one stays.
# A starter with no tenants (every request gets 401): put your own here, checked first
# with `meshtoll policy check`. The README's policy reference lists every key.
plans:
  free:
    limits:
      - {requests: 10, per: second}
tenants: {}
"""


def kubernetes_files(params: DeployParams) -> dict[str, str]:
    base = {
        "base/kustomization.yaml": base_kustomization(params),
        "base/policy.yaml": STARTER_POLICY,
        "base/namespace.yaml": yaml_file("meshtoll's own namespace.", _namespace(params)),
        "base/deployment.yaml": yaml_file(DEPLOYMENT_COMMENT, deployment(params)),
        "base/service.yaml": yaml_file(SERVICE_COMMENT, service(params)),
        "base/autoscaling.yaml": yaml_file(AUTOSCALING_COMMENT, *autoscaling(params)),
        "base/network-policy.yaml": yaml_file(NETWORK_POLICY_COMMENT, network_policy(params)),
        "secret.example.yaml": yaml_file(SECRET_COMMENT, secret(params, _redis_url(params), "")),
    }
    return base | redis_overlay(params) | sidecar_overlay(params)


def _metadata(name: str, params: DeployParams, labels: dict[str, str] = LABELS) -> dict[str, Any]:
    return {"name": name, "namespace": params.namespace, "labels": dict(labels)}


def _namespace(params: DeployParams) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": params.namespace}}


def base_kustomization(params: DeployParams) -> str:
    document = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": params.namespace,
        "resources": [
            "namespace.yaml",
            "deployment.yaml",
            "service.yaml",
            "autoscaling.yaml",
            "network-policy.yaml",
        ],
        "configMapGenerator": [
            {
                "name": "meshtoll-policy",
                "files": ["policy.yaml"],
                # A fixed name: the mounted directory is updated in place and meshtoll
                # reloads it, instead of a new ConfigMap name restarting every pod.
                "options": {"disableNameSuffixHash": True, "labels": dict(LABELS)},
            }
        ],
    }
    return yaml_file(
        f"""
meshtoll in Kubernetes: `kubectl apply -k deploy/k8s/base` after creating the Secret
`{SECRET}` (keys redis-url and admin-token; see secret.example.yaml), or
`kubectl apply -k deploy/k8s/overlays/in-cluster-redis` to try it with a Redis of its own.
""",
        document,
    )


def _env(params: DeployParams) -> list[dict[str, Any]]:
    plain = {
        "policy": f"{POLICY_DIR}/policy.yaml",
        "host": "0.0.0.0",
        "grpc_port": params.grpc_port,
        "http_authz_port": params.http_authz_port,
        "admin_port": params.admin_port,
    }
    env: list[dict[str, Any]] = [
        {"name": Settings.env_name(key), "value": str(value)} for key, value in plain.items()
    ]
    for field, key, optional in (("redis_url", "redis-url", False), ("admin_token", "admin-token", True)):
        env.append(
            {
                "name": Settings.env_name(field),
                "valueFrom": {"secretKeyRef": {"name": SECRET, "key": key, "optional": optional}},
            }
        )
    return env


def _probe(path: str, params: DeployParams, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "admin"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def _security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": _NON_ROOT_UID,
        "runAsGroup": _NON_ROOT_UID,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def deployment(params: DeployParams) -> dict[str, Any]:
    container = {
        "name": NAME,
        "image": params.image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["serve"],
        "env": _env(params),
        "ports": [
            {"name": "grpc", "containerPort": params.grpc_port, "protocol": "TCP"},
            {"name": "http-authz", "containerPort": params.http_authz_port, "protocol": "TCP"},
            {"name": "admin", "containerPort": params.admin_port, "protocol": "TCP"},
        ],
        "readinessProbe": _probe("/readyz", params, period=5, failures=2),
        "livenessProbe": _probe("/healthz", params, period=10, failures=3),
        "startupProbe": _probe("/healthz", params, period=2, failures=30),
        "resources": {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": _security_context(),
        "volumeMounts": [
            {"name": "policy", "mountPath": POLICY_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(NAME, params),
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": dict(SELECTOR)},
            "template": {
                "metadata": {"labels": dict(LABELS)},
                "spec": {
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {"fsGroup": _NON_ROOT_UID},
                    "affinity": {
                        "podAntiAffinity": {
                            "preferredDuringSchedulingIgnoredDuringExecution": [
                                {
                                    "weight": 100,
                                    "podAffinityTerm": {
                                        "topologyKey": "kubernetes.io/hostname",
                                        "labelSelector": {"matchLabels": dict(SELECTOR)},
                                    },
                                }
                            ]
                        }
                    },
                    "containers": [container],
                    "volumes": [
                        {"name": "policy", "configMap": {"name": "meshtoll-policy"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                    ],
                },
            },
        },
    }


DEPLOYMENT_COMMENT = """
meshtoll serve, configured by MESHTOLL_* variables (the Redis URL and admin token from the
Secret), two replicas on different nodes where possible, non-root, read-only root file
system. /readyz is 503 until the policy has loaded, so the Service sends no decisions to a
pod that cannot take them (a Redis outage it reports but stays ready: the failure policy
decides then, not the probe); /healthz only says the process answers.
The policy ConfigMap is mounted as a directory (never subPath, which would pin the first
version): Kubernetes swaps the directory's symlink on update and meshtoll reloads it.
"""


def service(params: DeployParams) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(NAME, params),
        "spec": {
            "selector": dict(SELECTOR),
            "ports": [
                {"name": "grpc", "port": params.grpc_port, "targetPort": "grpc", "appProtocol": "grpc"},
                {
                    "name": "http-authz",
                    "port": params.http_authz_port,
                    "targetPort": "http-authz",
                    "appProtocol": "http",
                },
                {
                    "name": "http-admin",
                    "port": params.admin_port,
                    "targetPort": "admin",
                    "appProtocol": "http",
                },
            ],
        },
    }


SERVICE_COMMENT = """
Named ports with their protocols: istiod gives the gateway an HTTP/2 cluster for the gRPC
port only because it is declared gRPC (appProtocol: grpc); without it ext_authz's gRPC
transport, the RLS, ext_proc and the access log would be sent HTTP/1.1 and fail.
"""


def autoscaling(params: DeployParams) -> tuple[dict[str, Any], dict[str, Any]]:
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(NAME, params),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": NAME},
            "minReplicas": 2,
            "maxReplicas": 10,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
                }
            ],
        },
    }
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(NAME, params),
        "spec": {"minAvailable": 1, "selector": {"matchLabels": dict(SELECTOR)}},
    }
    return hpa, pdb


AUTOSCALING_COMMENT = """
Scale on CPU (decisions are CPU-bound: state is in Redis, so any replica answers any
request), and keep one replica through node drains: with none, the gateway fails closed.
"""


def network_policy(params: DeployParams) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(NAME, params),
        "spec": {
            "podSelector": {"matchLabels": dict(SELECTOR)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": params.gateway_namespace}
                            },
                            "podSelector": {"matchLabels": params.gateway_pod_labels},
                        }
                    ],
                    "ports": [
                        {"protocol": "TCP", "port": params.grpc_port},
                        {"protocol": "TCP", "port": params.http_authz_port},
                    ],
                },
                {
                    "from": [
                        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
                    ],
                    "ports": [{"protocol": "TCP", "port": params.admin_port}],
                },
            ],
        },
    }


NETWORK_POLICY_COMMENT = """
Only the ingress gateway reaches meshtoll's decision ports (gRPC: ext_authz, RLS, ext_proc,
access log; HTTP ext_authz). Anything that reaches the gRPC port could otherwise send
access-log entries, report ext_proc units or spend a tenant's limits; anything that reaches
the HTTP authz port could make admissions for a key it holds. The admin port is open to
the `monitoring` namespace (Prometheus); kubelet probes are not subject to NetworkPolicy;
/api/* needs the admin token from anywhere but loopback.
"""


def _redis_url(params: DeployParams) -> str:
    return f"redis://redis.{params.namespace}.svc.cluster.local:6379/0"


def secret(params: DeployParams, redis_url: str, admin_token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(SECRET, params),
        "type": "Opaque",
        "stringData": {"redis-url": redis_url, "admin-token": admin_token},
    }


SECRET_COMMENT = """
The Secret the base expects (not part of it, so that re-applying the base never resets
your values). Create it rather than committing it:
  kubectl -n meshtoll create secret generic meshtoll \\
    --from-literal=redis-url='rediss://:PASSWORD@your-redis:6380/0' \\
    --from-literal=admin-token="$(openssl rand -hex 32)"
An empty admin-token leaves the admin API's /api/* to loopback clients only.
"""


def redis_overlay(params: DeployParams) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "redis", "app.kubernetes.io/part-of": NAME}
    selector = {"app.kubernetes.io/name": "redis"}
    redis = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata("redis", params, labels),
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
                            "securityContext": {**_security_context(), "runAsUser": 999, "runAsGroup": 999},
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
        "metadata": _metadata("redis", params, labels),
        "spec": {
            "selector": selector,
            "ports": [{"name": "tcp-redis", "port": 6379, "targetPort": "redis", "appProtocol": "redis"}],
        },
    }
    only_meshtoll = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata("redis", params, labels),
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
                "literals": [f"redis-url={_redis_url(params)}"],
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
        "securityContext": _security_context(),
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
        *[item for item in _env(params) if "valueFrom" in item],
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
        "securityContext": _security_context(),
        "volumeMounts": [
            {"name": "policy", "mountPath": POLICY_DIR, "readOnly": True},
            {"name": "sockets", "mountPath": str(SOCKETS)},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    gateway = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(GATEWAY, params, labels),
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {"fsGroup": _NON_ROOT_UID},
                    "containers": [envoy, meshtoll],
                    "volumes": [
                        {"name": "envoy-config", "configMap": {"name": f"{GATEWAY}-envoy"}},
                        {"name": "policy", "configMap": {"name": "meshtoll-policy"}},
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
        "metadata": _metadata(GATEWAY, params, labels),
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
                "name": "meshtoll-policy",
                "files": ["policy.yaml"],
                "options": {"disableNameSuffixHash": True, "labels": dict(LABELS)},
            },
        ],
    }
    root = "overlays/gateway-sidecar"
    return {
        f"{root}/kustomization.yaml": yaml_file(SIDECAR_COMMENT, kustomization),
        f"{root}/namespace.yaml": yaml_file("meshtoll's own namespace.", _namespace(params)),
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
