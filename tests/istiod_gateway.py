"""A gateway Envoy bootstrap assembled from deploy/istio the way istiod builds one for an
ingress gateway, for tests: istiod's own filters (istio.*, stats, metadata exchange) are not
in upstream Envoy and are left out; what meshtoll's files decide is reproduced.

- the ext_authz filter, translated from the `meshtoll-http` mesh-config provider as istiod
  translates an envoyExtAuthzHttp provider named by a CUSTOM AuthorizationPolicy;
- meshConfig.pathNormalization MERGE_SLASHES: normalize_path and merge_slashes;
- the access log of the Telemetry's `meshtoll-meter` provider (envoyOtelAls: no buffer
  settings, Envoy's defaults);
- the clusters `outbound|<port>||<service>` for meshtoll's Service ports, HTTP/2 exactly for
  the ports the Service declares gRPC (appProtocol or a grpc name), as istiod decides;
- then every EnvoyFilter, in ascending priority: NETWORK_FILTER MERGE into the connection
  manager, HTTP_FILTER INSERT_BEFORE the router.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).parent.parent
ISTIO = ROOT / "deploy" / "istio"
SERVICE = ROOT / "deploy" / "k8s" / "base" / "service.yaml"
HCM = "envoy.filters.network.http_connection_manager"
_STATUS = {"503": "ServiceUnavailable", "403": "Forbidden"}


def _matchers(names: list[str]) -> dict[str, Any]:
    return {"patterns": [{"prefix": name[:-1]} if name.endswith("*") else {"exact": name} for name in names]}


def provider(name: str) -> dict[str, Any]:
    mesh = yaml.safe_load((ISTIO / "mesh-config.yaml").read_text())
    found: dict[str, Any] = next(item for item in mesh["extensionProviders"] if item["name"] == name)
    return found


def cluster_name(port: int, service: str) -> str:
    return f"outbound|{port}||{service}"


def ext_authz_filter() -> dict[str, Any]:
    http = provider("meshtoll-http")["envoyExtAuthzHttp"]
    cluster = cluster_name(http["port"], http["service"])
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "failure_mode_allow": http["failOpen"],
            "status_on_error": {"code": _STATUS[http["statusOnError"]]},
            "allowed_headers": _matchers(http["includeRequestHeadersInCheck"]),
            "http_service": {
                "server_uri": {
                    "uri": f"http://{http['service']}",
                    "cluster": cluster,
                    "timeout": http["timeout"],
                },
                "authorization_request": {
                    "headers_to_add": [
                        {"key": key, "value": value}
                        for key, value in http["includeAdditionalHeadersInCheck"].items()
                    ],
                },
                "authorization_response": {
                    "allowed_upstream_headers": _matchers(http["headersToUpstreamOnAllow"]),
                    "allowed_client_headers": _matchers(http["headersToDownstreamOnDeny"]),
                    "allowed_client_headers_on_success": _matchers(http["headersToDownstreamOnAllow"]),
                },
            },
        },
    }


def meter_logger() -> dict[str, Any]:
    """The `meshtoll-meter` provider as istiod translates an envoyOtelAls provider: the log
    name and the cluster in the (deprecated) common_config, Envoy's built-in labels off,
    the text format as the body, no attributes without labels."""
    otel = provider("meshtoll-meter")["envoyOtelAls"]
    return {
        "name": "envoy.access_loggers.open_telemetry",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.open_telemetry.v3.OpenTelemetryAccessLogConfig",
            "common_config": {
                "log_name": otel["logName"],
                "transport_api_version": "V3",
                "grpc_service": {
                    "envoy_grpc": {
                        "cluster_name": cluster_name(otel["port"], otel["service"]),
                        "authority": otel["service"],
                    }
                },
            },
            "disable_builtin_labels": True,
            "body": {"string_value": otel["logFormat"]["text"]},
        },
    }


def meshtoll_clusters(service: str, addresses: dict[int, int]) -> list[dict[str, Any]]:
    """One cluster per port of meshtoll's Service; `addresses` maps a Service port to the
    loopback port meshtoll really listens on."""
    declared = yaml.safe_load(SERVICE.read_text())
    clusters = []
    for port in declared["spec"]["ports"]:
        name = cluster_name(port["port"], service)
        cluster: dict[str, Any] = {
            "name": name,
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": _loopback(addresses[port["port"]])}}]}
                ],
            },
        }
        if port.get("appProtocol") == "grpc" or port["name"].split("-")[0] in ("grpc", "http2"):
            cluster["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            }
        clusters.append(cluster)
    return clusters


def _loopback(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def envoyfilters() -> list[dict[str, Any]]:
    documents = [yaml.safe_load(path.read_text()) for path in sorted(ISTIO.glob("*envoyfilter.yaml"))]
    return sorted(documents, key=lambda document: document["spec"].get("priority", 0))


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Protobuf merge, as istiod's MERGE does: messages merge, lists append, scalars replace."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        elif isinstance(value, list) and isinstance(target.get(key), list):
            target[key] = target[key] + copy.deepcopy(value)
        else:
            target[key] = copy.deepcopy(value)


def apply_envoyfilters(manager: dict[str, Any]) -> None:
    for document in envoyfilters():
        for patch in document["spec"]["configPatches"]:
            assert patch["match"]["context"] == "GATEWAY"
            value = patch["patch"]["value"]
            if patch["applyTo"] == "NETWORK_FILTER":
                assert patch["patch"]["operation"] == "MERGE"
                _merge(manager, value["typed_config"])
            else:
                assert (patch["applyTo"], patch["patch"]["operation"]) == ("HTTP_FILTER", "INSERT_BEFORE")
                filters = manager["http_filters"]
                router = next(
                    index for index, item in enumerate(filters) if item["name"] == "envoy.filters.http.router"
                )
                filters.insert(router, copy.deepcopy(value))


def gateway_bootstrap(
    admin_port: int, listen_port: int, upstream_port: int, meshtoll_ports: dict[int, int]
) -> dict[str, Any]:
    service = provider("meshtoll-http")["envoyExtAuthzHttp"]["service"]
    manager: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "outbound_0.0.0.0_8080",
        "use_remote_address": True,
        "normalize_path": True,
        "merge_slashes": True,
        "access_log": [meter_logger()],
        "route_config": {
            "name": "http.8080",
            "virtual_hosts": [
                {
                    "name": "upstream",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                }
            ],
        },
        "http_filters": [
            ext_authz_filter(),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    apply_envoyfilters(manager)
    upstream = {
        "name": "upstream",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "upstream",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _loopback(upstream_port)}}]}],
        },
    }
    return {
        "admin": {"address": _loopback(admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "0.0.0.0_8080",
                    "address": _loopback(listen_port),
                    "filter_chains": [{"filters": [{"name": HCM, "typed_config": manager}]}],
                }
            ],
            "clusters": [upstream, *meshtoll_clusters(service, meshtoll_ports)],
        },
    }
