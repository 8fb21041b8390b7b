"""The Kubernetes objects and facts the base and the overlays share: meshtoll's name and
labels, metadata, its environment, the container security context, the Secret."""

from __future__ import annotations

from typing import Any

from meshtoll.render.container import POLICY_DIR
from meshtoll.render.params import DeployParams
from meshtoll.settings import Settings

NAME = "meshtoll"
SELECTOR = {"app.kubernetes.io/name": NAME}
LABELS = {**SELECTOR, "app.kubernetes.io/part-of": NAME}
SECRET = NAME  # keys: redis-url, admin-token
POLICY_CONFIG_MAP = f"{NAME}-policy"  # generated from policy.yaml, mounted at POLICY_DIR
NON_ROOT_UID = 10001  # the image's USER (Dockerfile)

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


def metadata(name: str, params: DeployParams, labels: dict[str, str] = LABELS) -> dict[str, Any]:
    return {"name": name, "namespace": params.namespace, "labels": dict(labels)}


def namespace_object(params: DeployParams) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": params.namespace}}


def meshtoll_env(params: DeployParams) -> list[dict[str, Any]]:
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


def security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": NON_ROOT_UID,
        "runAsGroup": NON_ROOT_UID,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def redis_url(params: DeployParams) -> str:
    return f"redis://redis.{params.namespace}.svc.cluster.local:6379/0"


def secret(params: DeployParams, redis_url: str, admin_token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(SECRET, params),
        "type": "Opaque",
        "stringData": {"redis-url": redis_url, "admin-token": admin_token},
    }
