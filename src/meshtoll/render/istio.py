"""deploy/istio: meshtoll on an Istio ingress gateway, from the local Envoy's filters.

Istio builds the gateway's ext_authz filter itself from a mesh-config extension provider
(named by a CUSTOM AuthorizationPolicy); the hooks, the ratelimit filter and the edge
settings, for which Istio has no API, are EnvoyFilter patches with an explicit priority.
"""

from __future__ import annotations

from typing import Any

from meshtoll.render.documents import yaml_file
from meshtoll.render.local_filters import LocalFilters, with_grpc_cluster
from meshtoll.render.params import DeployParams

# EnvoyFilters apply in ascending priority (creation time breaks ties, which is why it is
# set): each INSERT_BEFORE the router lands after the previous one, so this order is the
# filter order after Istio's own ext_authz: hooks (they may set the units), then ratelimit.
PRIORITY = {"meshtoll-edge": -10, "meshtoll-hooks": 10, "meshtoll-ratelimit": 20}
HTTP_PROVIDER = "meshtoll-http"
GRPC_PROVIDER = "meshtoll-grpc"
METER_PROVIDER = "meshtoll-meter"
TRACING_PROVIDER = "meshtoll-tracing"
METER_ALS_PROVIDER = "meshtoll-meter-als"
_STATUS = {"ServiceUnavailable": "503", "Forbidden": "403"}


# istiod's meshConfig: a fragment to merge into the one istiod has, not an object to apply.
MESH_CONFIG = "mesh-config.yaml"


def istio_objects(params: DeployParams, files: dict[str, str]) -> dict[str, str]:
    """What to `kubectl apply`: every file but the meshConfig fragment."""
    return {name: text for name, text in files.items() if name != MESH_CONFIG}


def istio_files(params: DeployParams) -> dict[str, str]:
    local = LocalFilters.load(params.api_key_query_param)
    return {
        MESH_CONFIG: mesh_config(params, local),
        "authorization-policy.yaml": authorization_policy(params),
        "edge-envoyfilter.yaml": edge_envoyfilter(params, local),
        "hooks-envoyfilter.yaml": hooks_envoyfilter(params, local),
        "ratelimit-envoyfilter.yaml": ratelimit_envoyfilter(params, local),
        "telemetry.yaml": telemetry(params),
        "meshtoll-access.yaml": meshtoll_access(params),
    }


def _names(patterns: list[dict[str, str]]) -> list[str]:
    """Envoy string matchers as Istio writes them: `x-meshtoll-*` for a prefix."""
    return [item["exact"] if "exact" in item else item["prefix"] + "*" for item in patterns]


def providers(params: DeployParams, local: LocalFilters) -> list[dict[str, Any]]:
    http = local.http_authz()
    service = http["http_service"]
    response = service["authorization_response"]
    grpc = local.grpc_authz()
    meter = local.meter()
    meter_als = local.meter("full_als")
    return [
        {
            "name": HTTP_PROVIDER,
            "envoyExtAuthzHttp": {
                "service": params.service_fqdn,
                "port": params.http_authz_port,
                "timeout": service["server_uri"]["timeout"],
                "failOpen": http["failure_mode_allow"],
                "statusOnError": _STATUS[http["status_on_error"]["code"]],
                "includeRequestHeadersInCheck": _names(http["allowed_headers"]["patterns"]),
                "includeAdditionalHeadersInCheck": {
                    item["key"]: item["value"] for item in service["authorization_request"]["headers_to_add"]
                },
                "headersToUpstreamOnAllow": _names(response["allowed_upstream_headers"]["patterns"]),
                "headersToDownstreamOnAllow": _names(
                    response["allowed_client_headers_on_success"]["patterns"]
                ),
                "headersToDownstreamOnDeny": _names(response["allowed_client_headers"]["patterns"]),
            },
        },
        {
            "name": GRPC_PROVIDER,
            "envoyExtAuthzGrpc": {
                "service": params.service_fqdn,
                "port": params.grpc_port,
                "timeout": grpc["grpc_service"]["timeout"],
                "failOpen": grpc["failure_mode_allow"],
                "statusOnError": _STATUS[grpc["status_on_error"]["code"]],
            },
        },
        {
            "name": METER_PROVIDER,
            "envoyOtelAls": {
                "service": params.service_fqdn,
                "port": params.grpc_port,
                "logName": meter["common_config"]["log_name"],
                "logFormat": {"text": meter["body"]["string_value"]},
            },
        },
        {
            "name": METER_ALS_PROVIDER,
            "envoyHttpAls": {
                "service": params.service_fqdn,
                "port": params.grpc_port,
                "logName": meter_als["common_config"]["log_name"],
                "additionalRequestHeadersToLog": meter_als["additional_request_headers_to_log"],
            },
        },
        {
            "name": TRACING_PROVIDER,
            "opentelemetry": {"service": params.collector_host, "port": params.collector_port},
        },
    ]


def mesh_config(params: DeployParams, local: LocalFilters) -> str:
    manager = local.connection_manager()
    # Istio's MERGE_SLASHES is BASE normalisation plus merge_slashes, what the local Envoy does.
    assert manager["normalize_path"] is manager["merge_slashes"] is True
    document = {
        "pathNormalization": {"normalization": "MERGE_SLASHES"},
        "extensionProviders": providers(params, local),
    }
    return yaml_file(MESH_CONFIG_COMMENT, document)


MESH_CONFIG_COMMENT = """
meshConfig for istiod: meshtoll's extension providers, and the path normalisation its
route rules assume. Merge into the meshConfig you already have, do not replace it:
  - IstioOperator / istioctl: under spec.meshConfig (append to an existing
    extensionProviders list);
  - the istiod Helm chart: under the `meshConfig` value (helm upgrade istiod ... -f);
  - a running istiod: `kubectl -n istio-system edit configmap istio` (key `mesh`).
extensionProviders is a list: list yours and these together, or istiod keeps only one.

meshtoll-http  the fast path (HTTP ext_authz, about a tenth of gRPC's CPU per call); fails
               closed with 503. The header lists are the local Envoy's (envoy/local.yaml):
               the denial headers are also in headersToUpstreamOnAllow, because Envoy
               1.37.0 passes a denial's header to the client only when both lists name it.
               Istio's HTTP provider has no dynamic_metadata_from_headers: on Istio the
               x-meshtoll-* values travel as request headers only, which is all the
               ratelimit descriptors and the meter read.
meshtoll-grpc  the same decisions over gRPC; the client certificate's SPIFFE ID arrives as
               the peer principal.
meshtoll-meter the meter (enabled by telemetry.yaml): Envoy's OpenTelemetry access log
               with one text line per request, the local Envoy's (envoy/local.yaml), which
               costs the gateway and meshtoll less than the gRPC access log. Istio sets no
               buffer options on it, so Envoy's defaults apply: flush every 1 s or 16 KiB
               (the local Envoy uses 0.5 s / 64 KiB); reconciliation bills what a gateway
               restart loses from the buffer.
meshtoll-meter-als  the same meter through Envoy's gRPC access log (envoyHttpAls), for
               those who keep it: name it in telemetry.yaml instead of meshtoll-meter.
meshtoll-tracing  the gateway's own spans, over OTLP/gRPC to the OpenTelemetry collector
               (enabled by telemetry.yaml): give meshtoll the same collector
               (OTEL_EXPORTER_OTLP_ENDPOINT) and one trace shows the gateway and meshtoll.

MERGE_SLASHES: `/v1/public/../admin`, `%2e%2e` and `/v1//chat` reach meshtoll, the
AuthorizationPolicy and the upstream as `/v1/admin` and `/v1/chat` (mesh-wide). Escaped
slashes are refused by edge-envoyfilter.yaml.
"""


def _target(params: DeployParams, selector_key: str) -> dict[str, Any]:
    """Where an Istio resource applies: the gateway's pods, or a Gateway API Gateway."""
    if params.gateway_ref is not None:
        return {
            "targetRefs": [
                {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": params.gateway_ref}
            ]
        }
    return {
        selector_key: {
            "labels" if selector_key == "workloadSelector" else "matchLabels": params.gateway_pod_labels
        }
    }


def _metadata(name: str, namespace: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "meshtoll"}}


def authorization_policy(params: DeployParams) -> str:
    document = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": _metadata("meshtoll", params.gateway_namespace),
        "spec": {
            **_target(params, "selector"),
            "action": "CUSTOM",
            "provider": {"name": HTTP_PROVIDER if params.authz_transport == "http" else GRPC_PROVIDER},
            # One empty rule matches every request. No exempt paths: the gateway's own
            # readiness is another listener (port 15021), and an exempt path would skip
            # authz while keeping whatever x-meshtoll-* headers a client sent.
            "rules": [{}],
        },
    }
    return yaml_file(
        """
Every request through the ingress gateway goes to one of meshtoll's ext_authz providers
(mesh-config.yaml), without exceptions: meshtoll-http, the fast path, or meshtoll-grpc
(`meshtoll render istio --authz-transport grpc`).
""",
        document,
    )


def _envoyfilter(params: DeployParams, name: str, patches: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": _metadata(name, params.gateway_namespace),
        "spec": {**_target(params, "workloadSelector"), "priority": PRIORITY[name], "configPatches": patches},
    }


def _before_router(value: dict[str, Any]) -> dict[str, Any]:
    return {
        "applyTo": "HTTP_FILTER",
        "match": {
            "context": "GATEWAY",
            "listener": {
                "filterChain": {
                    "filter": {
                        "name": "envoy.filters.network.http_connection_manager",
                        "subFilter": {"name": "envoy.filters.http.router"},
                    }
                }
            },
        },
        "patch": {"operation": "INSERT_BEFORE", "value": value},
    }


def edge_envoyfilter(params: DeployParams, local: LocalFilters) -> str:
    manager = local.connection_manager()
    merged = {
        "@type": manager["@type"],
        "early_header_mutation_extensions": manager["early_header_mutation_extensions"],
        "path_with_escaped_slashes_action": manager["path_with_escaped_slashes_action"],
        "local_reply_config": manager["local_reply_config"],
    }
    patch = {
        "applyTo": "NETWORK_FILTER",
        "match": {
            "context": "GATEWAY",
            "listener": {
                "filterChain": {"filter": {"name": "envoy.filters.network.http_connection_manager"}}
            },
        },
        "patch": {"operation": "MERGE", "value": {"typed_config": merged}},
    }
    patches = [patch]
    hidden = local.hidden_query_key()
    if hidden is not None:
        # Applied before the hooks' and ratelimit's EnvoyFilters (a lower priority), so that
        # it lands right after Istio's ext_authz.
        patches.append(_before_router(hidden))
    return yaml_file(
        """
The trust boundary on the ingress gateway, as the local Envoy draws it, for what Istio has
no setting of its own:
- every client-sent x-meshtoll-* header, and the client's x-request-id, are removed before
  routing, any filter (ext_authz, ext_proc, ratelimit) or the access log (the meter) sees
  the request, allowed or refused; Envoy then generates its own request id, billed once;
- a path with an escaped slash or backslash (%2F, %5C) is refused with 400;
- a failed call to meshtoll answers 503 (the provider's statusOnError) on Envoy 1.37.0 too,
  which answers 403 for the HTTP transport's errors (envoyproxy/envoy#43257).
The normalisation itself (`..`, `.`, `//`) is meshConfig.pathNormalization (mesh-config.yaml).
An Envoy that does not know a field rejects the whole listener update: after applying,
check `istioctl proxy-status` and the gateway's listeners.
"""
        + (
            ""
            if hidden is None
            else f"With --api-key-query-param: the query parameter {params.api_key_query_param!r} (an API\n"
            "key) is removed after ext_authz, which an HTTP authorization answer cannot ask for.\n"
        ),
        _envoyfilter(params, "meshtoll-edge", patches),
    )


def hooks_envoyfilter(params: DeployParams, local: LocalFilters) -> str:
    cluster = params.cluster(params.grpc_port)
    patches = [_before_router(with_grpc_cluster(item, cluster)) for item in local.hooks()]
    return yaml_file(
        f"""
meshtoll's ext_proc hooks on the ingress gateway: one composite filter that builds an
ext_proc filter only for the requests meshtoll's ext_authz marked with x-meshtoll-extproc
(routes whose policy has hooks), one per failure mode; routes without hooks never reach
an ext_proc filter. Inserted after Istio's ext_authz and before the ratelimit filter
(priority {PRIORITY["meshtoll-hooks"]} < {PRIORITY["meshtoll-ratelimit"]}). The cluster
  {cluster}
is the one istiod builds for meshtoll's Service port; it speaks HTTP/2 because the port is
declared gRPC (appProtocol: grpc, deploy/k8s/base/service.yaml).
""",
        _envoyfilter(params, "meshtoll-hooks", patches),
    )


def ratelimit_envoyfilter(params: DeployParams, local: LocalFilters) -> str:
    value = with_grpc_cluster(local.ratelimit(), params.cluster(params.grpc_port))
    return yaml_file(
        """
Envoy's ratelimit filter on the ingress gateway, calling meshtoll's rate-limit service
with one (tenant, route) descriptor per request, read from the x-meshtoll-* request
headers meshtoll's ext_authz set (not dynamic metadata: Istio's HTTP provider cannot emit
it), and a charge after the response for units a body hook read. Only for routes whose
limits are `enforced_in: service`; the fused path needs no EnvoyFilter.
The descriptors sit in the filter (`rate_limits`, Istio 1.28 or later keeps them), not the
gateway's routes. Request-phase limits with apply_on_stream_done need an Envoy with the
fix for envoyproxy/envoy#43877 (CVE-2026-26330: a crash when the RLS is unreachable):
check your gateway proxy's Envoy version before applying this file.
""",
        _envoyfilter(params, "meshtoll-ratelimit", [_before_router(value)]),
    )


def telemetry(params: DeployParams) -> str:
    document = {
        "apiVersion": "telemetry.istio.io/v1",
        "kind": "Telemetry",
        "metadata": _metadata("meshtoll-meter", params.gateway_namespace),
        "spec": {
            **_target(params, "selector"),
            # A Telemetry access-log list replaces meshConfig.accessLogFile for the workload:
            # `envoy` (Istio's built-in stdout provider) keeps the gateway's own access log.
            "accessLogging": [{"providers": [{"name": "envoy"}, {"name": METER_PROVIDER}]}],
            "tracing": [
                {
                    "providers": [{"name": TRACING_PROVIDER}],
                    "randomSamplingPercentage": params.trace_sampling_percent,
                }
            ],
        },
    }
    return yaml_file(
        """
Turns on meshtoll's meter (meshtoll-meter in mesh-config.yaml) for the ingress gateway,
beside the gateway's own access log (the `envoy` provider, which this list would otherwise
replace; remove it only if the gateway logged nothing before). Requests authz refused
carry no tenant (edge-envoyfilter.yaml removes a client's x-meshtoll-* first): not metered.
And the gateway's traces (meshtoll-tracing) for a share of its requests, and every request
whose client sent a sampled traceparent.
""",
        document,
    )


def meshtoll_access(params: DeployParams) -> str:
    selector = {"matchLabels": {"app.kubernetes.io/name": "meshtoll"}}
    peer = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": _metadata("meshtoll", params.namespace),
        "spec": {"selector": selector, "mtls": {"mode": "STRICT"}},
    }
    access = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": _metadata("meshtoll-callers", params.namespace),
        "spec": {
            "selector": selector,
            "action": "ALLOW",
            "rules": [
                {
                    "from": [{"source": {"principals": [params.gateway_principal]}}],
                    "to": [{"operation": {"ports": [str(params.grpc_port), str(params.http_authz_port)]}}],
                },
                {
                    "to": [
                        {
                            "operation": {
                                "ports": [str(params.admin_port)],
                                "paths": ["/healthz", "/readyz", "/metrics"],
                                "methods": ["GET"],
                            }
                        }
                    ]
                },
            ],
        },
    }
    return yaml_file(
        f"""
When meshtoll runs in the mesh (with a sidecar): only the ingress gateway's identity
({params.gateway_principal}) may call its decision ports, proven by mutual TLS.
Probes and scrapers reach health and metrics only: /api/* is refused here as well as by
the admin token; add a rule with the principal of whatever reads usage and invoices (a
billing job) if it calls the admin API in-cluster.
""",
        peer,
        access,
    )
