"""docker-compose.yml: the stack `meshtoll dev` runs, in containers.

Envoy (the official image of the version the tests run, with deploy/envoy/envoy.yaml),
meshtoll built from the Dockerfile, Redis, and the demo upstream; each waits for what it
needs to be healthy, so `docker compose up` answers the same curl lines as `meshtoll dev`.
"""

from __future__ import annotations

from typing import Any

from meshtoll.render.container import POLICY_DIR, READY_CHECK, REDIS_IMAGE
from meshtoll.render.documents import yaml_file
from meshtoll.render.envoy import LISTENERS
from meshtoll.render.params import DeployParams
from meshtoll.settings import Settings

JAEGER_IMAGE = "jaegertracing/jaeger:2.14.1"
_INTERVAL = {"interval": "5s", "timeout": "3s", "retries": 12, "start_period": "5s"}


def compose_files(params: DeployParams) -> dict[str, str]:
    return {"docker-compose.yml": compose(params)}


def _healthy(*services: str) -> dict[str, Any]:
    return {name: {"condition": "service_healthy"} for name in services}


def compose_document(params: DeployParams) -> dict[str, Any]:
    upstream_check = (
        "import urllib.request; "
        f"urllib.request.urlopen('http://127.0.0.1:{params.upstream_port}/healthz', timeout=2)"
    )
    return {
        "name": "meshtoll",
        "services": {
            "redis": {
                "image": REDIS_IMAGE,
                "healthcheck": {"test": ["CMD", "redis-cli", "ping"], **_INTERVAL},
            },
            params.meshtoll_host: {
                "build": {"context": "."},
                "image": params.image,
                "environment": {
                    Settings.env_name("redis_url"): "redis://redis:6379/0",
                    Settings.env_name("policy"): f"{POLICY_DIR}/policy.yaml",
                    # meshtoll's spans to the same collector as Envoy's, following Envoy's choice.
                    "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{params.collector_host}:{params.collector_port}",
                    "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                    "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                    "OTEL_TRACES_SAMPLER_ARG": str(params.trace_sampling_percent / 100),
                },
                # The demo policy of `meshtoll dev` (its demo keys), as a directory so that
                # editing examples/policy.yaml reloads it.
                "volumes": [f"./examples:{POLICY_DIR}:ro"],
                "ports": [f"127.0.0.1:{params.admin_port}:{params.admin_port}"],
                "read_only": True,
                "tmpfs": ["/tmp"],
                "healthcheck": {"test": ["CMD", "python", "-c", READY_CHECK], **_INTERVAL},
                "depends_on": _healthy("redis"),
            },
            params.upstream_host: {
                "image": params.image,
                "entrypoint": [
                    "python",
                    "-m",
                    "meshtoll.local.demo_upstream",
                    "--host",
                    "0.0.0.0",
                    "--port",
                    str(params.upstream_port),
                ],
                "healthcheck": {"test": ["CMD", "python", "-c", upstream_check], **_INTERVAL},
                "depends_on": _healthy(params.meshtoll_host),  # built by the meshtoll service
            },
            # The collector both send their spans to: Jaeger, which takes OTLP and shows the
            # traces on http://127.0.0.1:16686.
            params.collector_host: {
                "image": JAEGER_IMAGE,
                "command": [
                    f"--set=receivers.otlp.protocols.grpc.endpoint=0.0.0.0:{params.collector_port}",
                ],
                "ports": ["127.0.0.1:16686:16686"],
            },
            "envoy": {
                "image": params.envoy_image,
                "command": ["envoy", "-c", "/etc/envoy/envoy.yaml", "--log-level", "warn"],
                "volumes": ["./deploy/envoy/envoy.yaml:/etc/envoy/envoy.yaml:ro"],
                # Loopback only, as `meshtoll dev` listens: the demo keys are public.
                "ports": [
                    f"127.0.0.1:{params.listen_port + offset}:{params.listen_port + offset}"
                    for offset in LISTENERS.values()
                ],
                "depends_on": _healthy(params.meshtoll_host, params.upstream_host),
            },
        },
    }


def compose(params: DeployParams) -> str:
    http = f"http://127.0.0.1:{params.listen_port}"
    return yaml_file(
        f"""
`docker compose up --build`: the local stack of `meshtoll dev` in containers.
  {http}  HTTP ext_authz, hooks, metering; :{params.listen_port + 1} gRPC ext_authz
  curl -H 'x-api-key: mt_demo_acme_5f0c1e9a7b2d4e6f' {http}/v1/search?q=envoy   # 200
  curl -i {http}/v1/search                                                    # 401
meshtoll's admin port (/metrics, /healthz) is published on 127.0.0.1:{params.admin_port} only.
Traces (Envoy's and meshtoll's, one trace per request) on http://127.0.0.1:16686; every request
with a sampled traceparent is traced:
  curl -H 'x-api-key: mt_demo_acme_5f0c1e9a7b2d4e6f' \
       -H "traceparent: 00-$(openssl rand -hex 16)-$(openssl rand -hex 8)-01" {http}/v1/items
""",
        compose_document(params),
    )
