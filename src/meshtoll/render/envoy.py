"""deploy/envoy/envoy.yaml: a plain Envoy in front of meshtoll, reaching it and the upstream
by host name (docker-compose's service names by default).

It is the local stack's `full` listener (HTTP ext_authz with fused limits, the hooks, the
meter) on `listen_port` and its gRPC ext_authz listener on the next port, as `meshtoll dev`
offers them, with the clusters resolved by DNS instead of pointing at 127.0.0.1.
"""

from __future__ import annotations

from typing import Any

from meshtoll.render.documents import yaml_file
from meshtoll.render.local_filters import LocalFilters
from meshtoll.render.params import DeployParams

ADMIN_PORT = 9901
# Local listener name -> its port's offset from listen_port (as `meshtoll dev` numbers them).
LISTENERS = {"full": 0, "grpc_authz": 1}


def envoy_files(params: DeployParams) -> dict[str, str]:
    return {"envoy.yaml": envoy_bootstrap(params)}


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def bootstrap(params: DeployParams) -> dict[str, Any]:
    local = LocalFilters.load()
    listeners = []
    for name, offset in LISTENERS.items():
        listener = local.listener(name)
        listener["address"] = _address("0.0.0.0", params.listen_port + offset)
        listeners.append(listener)
    endpoints = {
        "upstream": (params.upstream_host, params.upstream_port),
        "meshtoll_http": (params.meshtoll_host, params.http_authz_port),
        "meshtoll_grpc": (params.meshtoll_host, params.grpc_port),
    }
    clusters = []
    for name, (host, port) in endpoints.items():
        cluster = local.cluster(name)
        # Containers come and go with new addresses: re-resolve rather than pin one.
        cluster["type"] = "STRICT_DNS"
        cluster["dns_lookup_family"] = "V4_ONLY"
        cluster["load_assignment"]["endpoints"] = [
            {"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}]}
        ]
        clusters.append(cluster)
    return {
        # The admin interface stays on the container's loopback: it can stop Envoy.
        "admin": {"address": _address("127.0.0.1", ADMIN_PORT)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
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
The README's "Envoy wiring" explains each setting; envoy/local.yaml has the comments.
""",
        bootstrap(params),
    )
