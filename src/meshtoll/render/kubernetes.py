"""deploy/k8s: meshtoll in Kubernetes as a kustomize base and overlays.

base/                       Deployment, Service, policy ConfigMap, HPA, PDB, NetworkPolicy
overlays/in-cluster-redis/  plus a single Redis and the Secret that points meshtoll at it
overlays/gateway-sidecar/   instead: an Envoy gateway pod with meshtoll as its sidecar,
                            over Unix sockets (for Kubernetes without Istio; overlays.py)
monitoring/                 ServiceMonitor (or PodMonitor) and PrometheusRule (monitoring.py)
"""

from __future__ import annotations

from typing import Any

from meshtoll.render.container import POLICY_DIR
from meshtoll.render.documents import yaml_file
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
    secret,
    security_context,
)
from meshtoll.render.monitoring import kubernetes_monitoring
from meshtoll.render.overlays import redis_overlay, sidecar_overlay
from meshtoll.render.params import DeployParams


def kubernetes_files(params: DeployParams) -> dict[str, str]:
    base = {
        "base/kustomization.yaml": base_kustomization(params),
        "base/policy.yaml": STARTER_POLICY,
        "base/namespace.yaml": yaml_file("meshtoll's own namespace.", namespace_object(params)),
        "base/deployment.yaml": yaml_file(DEPLOYMENT_COMMENT, deployment(params)),
        "base/service.yaml": yaml_file(SERVICE_COMMENT, service(params)),
        "base/autoscaling.yaml": yaml_file(AUTOSCALING_COMMENT, *autoscaling(params)),
        "base/network-policy.yaml": yaml_file(NETWORK_POLICY_COMMENT, network_policy(params)),
        "secret.example.yaml": yaml_file(SECRET_COMMENT, secret(params, redis_url(params), "")),
    }
    return base | redis_overlay(params) | sidecar_overlay(params) | kubernetes_monitoring(params)


# The base's objects, in the order its kustomization lists them; its policy becomes the
# ConfigMap the kustomization generates from policy.yaml.
BASE_RESOURCES = (
    "namespace.yaml",
    "deployment.yaml",
    "service.yaml",
    "autoscaling.yaml",
    "network-policy.yaml",
)


def kubernetes_objects(params: DeployParams, files: dict[str, str]) -> dict[str, str]:
    """What `kubectl apply -k base` applies, by source: the base's objects and its policy's
    ConfigMap (the overlays and the example Secret are files to adapt, not to apply)."""
    objects = {f"base/{name}": files[f"base/{name}"] for name in BASE_RESOURCES}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(POLICY_CONFIG_MAP, params),
        "data": {"policy.yaml": files["base/policy.yaml"]},
    }
    comment = "The policy meshtoll serves (base/policy.yaml), as the kustomization generates it."
    return objects | {"base/policy.yaml": yaml_file(comment, config_map)}


def base_kustomization(params: DeployParams) -> str:
    document = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": params.namespace,
        "resources": list(BASE_RESOURCES),
        "configMapGenerator": [
            {
                "name": POLICY_CONFIG_MAP,
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


def _probe(path: str, params: DeployParams, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "admin"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def deployment(params: DeployParams) -> dict[str, Any]:
    container = {
        "name": NAME,
        "image": params.image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["serve"],
        "env": meshtoll_env(params),
        "ports": [
            {"name": "grpc", "containerPort": params.grpc_port, "protocol": "TCP"},
            {"name": "http-authz", "containerPort": params.http_authz_port, "protocol": "TCP"},
            {"name": "admin", "containerPort": params.admin_port, "protocol": "TCP"},
        ],
        "readinessProbe": _probe("/readyz", params, period=5, failures=2),
        "livenessProbe": _probe("/healthz", params, period=10, failures=3),
        "startupProbe": _probe("/healthz", params, period=2, failures=30),
        "resources": {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": security_context(),
        "volumeMounts": [
            {"name": "policy", "mountPath": POLICY_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(NAME, params),
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": dict(SELECTOR)},
            "template": {
                "metadata": {"labels": dict(LABELS)},
                "spec": {
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {"fsGroup": NON_ROOT_UID},
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
                        {"name": "policy", "configMap": {"name": POLICY_CONFIG_MAP}},
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
        "metadata": metadata(NAME, params),
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
        "metadata": metadata(NAME, params),
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
        "metadata": metadata(NAME, params),
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
        "metadata": metadata(NAME, params),
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


SECRET_COMMENT = """
The Secret the base expects (not part of it, so that re-applying the base never resets
your values). Create it rather than committing it:
  kubectl -n meshtoll create secret generic meshtoll \\
    --from-literal=redis-url='rediss://:PASSWORD@your-redis:6380/0' \\
    --from-literal=admin-token="$(openssl rand -hex 32)"
An empty admin-token leaves the admin API's /api/* to loopback clients only.
"""
