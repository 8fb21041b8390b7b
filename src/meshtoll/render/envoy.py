"""deploy/envoy/envoy.yaml: a plain Envoy in front of meshtoll, reaching it and the upstream
by host name (docker-compose's service names by default).

It is the local stack's `full` listener (HTTP ext_authz with fused limits, the hooks, the
meter) on `listen_port` and its gRPC ext_authz listener on the next port, as `meshtoll dev`
offers them, with the clusters resolved by DNS instead of pointing at 127.0.0.1.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from meshtoll.render.documents import yaml_file
from meshtoll.render.local_filters import LocalFilters
from meshtoll.render.params import DeployParams
from meshtoll.server.listeners import UDS_GRPC, UDS_HTTP_AUTHZ

ADMIN_PORT = 9901
COLLECTOR = "otel_collector"
# Local listener name -> its port's offset from listen_port (as `meshtoll dev` numbers them).
LISTENERS = {"full": 0, "grpc_authz": 1}


def envoy_files(params: DeployParams) -> dict[str, str]:
    return {"envoy.yaml": envoy_bootstrap(params)}


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _by_host_name(host: str, port: int) -> dict[str, Any]:
    # Containers come and go with new addresses: re-resolve rather than pin one.
    return {"type": "STRICT_DNS", "dns_lookup_family": "V4_ONLY", "address": _address(host, port)}


def _by_unix_socket(path: PurePosixPath) -> dict[str, Any]:
    return {"type": "STATIC", "address": {"pipe": {"path": str(path)}}}


def bootstrap(params: DeployParams, unix_sockets: PurePosixPath | None = None) -> dict[str, Any]:
    """Reaching meshtoll by `params.meshtoll_host`, or through the Unix sockets `meshtoll
    serve --uds-dir` makes in the directory `unix_sockets` (meshtoll in the same pod)."""
    local = LocalFilters.load(params.api_key_query_param)
    listeners = []
    for name, offset in LISTENERS.items():
        listener = local.listener(name)
        listener["address"] = _address("0.0.0.0", params.listen_port + offset)
        if unix_sockets is None:
            for network_filter in listener["filter_chains"][0]["filters"]:
                network_filter["typed_config"]["tracing"] = tracing(params)
        listeners.append(listener)
    endpoints = {"upstream": _by_host_name(params.upstream_host, params.upstream_port)}
    if unix_sockets is None:
        endpoints[COLLECTOR] = _by_host_name(params.collector_host, params.collector_port)
    if unix_sockets is None:
        endpoints["meshtoll_http"] = _by_host_name(params.meshtoll_host, params.http_authz_port)
        endpoints["meshtoll_grpc"] = _by_host_name(params.meshtoll_host, params.grpc_port)
    else:
        endpoints["meshtoll_http"] = _by_unix_socket(unix_sockets / UDS_HTTP_AUTHZ)
        endpoints["meshtoll_grpc"] = _by_unix_socket(unix_sockets / UDS_GRPC)
    clusters = []
    for name, endpoint in endpoints.items():
        cluster = local.cluster("meshtoll_grpc" if name == COLLECTOR else name)  # an HTTP/2 cluster
        cluster["name"] = cluster["load_assignment"]["cluster_name"] = name
        address = endpoint.pop("address")
        cluster |= endpoint
        cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": [{"endpoint": {"address": address}}]}]
        clusters.append(cluster)
    return {
        # The admin interface stays on the container's loopback: it can stop Envoy.
        "admin": {"address": _address("127.0.0.1", ADMIN_PORT)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def tracing(params: DeployParams) -> dict[str, Any]:
    """Envoy's own spans over OTLP/gRPC to the collector meshtoll sends its spans to: the
    ext_authz and ext_proc calls carry their span's context, so one trace shows both."""
    return {
        "random_sampling": {"value": params.trace_sampling_percent},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "service_name": "envoy",
                "grpc_service": {"envoy_grpc": {"cluster_name": COLLECTOR}, "timeout": "1s"},
            },
        },
    }


def envoy_bootstrap(params: DeployParams) -> str:
    return yaml_file(
        f"""
A plain Envoy in front of meshtoll (`meshtoll render envoy`): the local stack's listeners,
tested end to end, with meshtoll at {params.meshtoll_host}:{params.grpc_port} (gRPC) and \
:{params.http_authz_port} (HTTP authz)
and the upstream at {params.upstream_host}:{params.upstream_port}.
  :{params.listen_port}  HTTP ext_authz (limits fused), ext_proc hooks, the meter (access log)
  :{params.listen_port + 1}  gRPC ext_authz
Traces of {params.trace_sampling_percent:g}% of requests (and of every request with a sampled traceparent) go
to the OpenTelemetry collector at {params.collector_host}:{params.collector_port} (OTLP/gRPC).
The README's "Envoy wiring" explains each setting; envoy/local.yaml has the comments.
""",
        bootstrap(params),
    )


def sidecar_bootstrap(params: DeployParams, unix_sockets: PurePosixPath) -> str:
    return yaml_file(
        f"""
The gateway pod's Envoy, with meshtoll as its sidecar: meshtoll reached over the Unix
sockets in {unix_sockets} (`meshtoll serve --uds-dir`), the upstream at
{params.upstream_host}:{params.upstream_port}; otherwise deploy/envoy/envoy.yaml.
""",
        bootstrap(params, unix_sockets),
    )
