"""Envoy bootstraps for the local stack, rendered from the templates in `envoy/`.

The templates use `${name}` placeholders (filled from the dataclasses below), YAML anchors
and `<<` merge keys so that every shared block is written once. Envoy's YAML parser has
no merge keys, so rendering also resolves them and emits plain YAML Envoy can load.
`src/meshtoll/envoy` is a symlink to the repository's `envoy/`, shipped as package data,
so a checkout and an installed wheel read the same files through one path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import yaml

from meshtoll.server.listeners import UDS_GRPC, UDS_HTTP_AUTHZ

LOCAL_TEMPLATE = "local.yaml"
MTLS_TEMPLATE = "mtls-listener.yaml"
STUB_TEMPLATE = "authz-stub.yaml"
# Top-level keys with this prefix hold anchors for the template only; Envoy rejects them.
_TEMPLATE_ONLY_PREFIX = "x-"


@dataclass(frozen=True, slots=True)
class EnvoyPorts:
    """Every port envoy/local.yaml listens on or connects to, all on 127.0.0.1."""

    admin_port: int
    listen_http_authz_port: int  # clients, ext_authz over HTTP to meshtoll
    listen_grpc_authz_port: int  # clients, ext_authz over gRPC to meshtoll
    listen_direct_port: int  # clients, direct 200 without upstream or authz
    listen_stub_authz_port: int  # clients, ext_authz over HTTP to the authz stub
    listen_rls_port: int  # clients, ext_authz over gRPC then the ratelimit filter (RLS)
    listen_rls_http_authz_port: int  # clients, ext_authz over HTTP then the ratelimit filter (RLS)
    listen_full_port: int  # clients, HTTP ext_authz and the access log to the meter
    listen_full_als_port: int  # clients, the same with the gRPC access log (http_grpc)
    listen_metered_direct_port: int  # clients, direct 200 response, metered (benchmark)
    listen_mtls_grpc_authz_port: int  # clients with certificates, ext_authz over gRPC (mTLS only)
    listen_mtls_http_authz_port: int  # clients with certificates, ext_authz over HTTP (mTLS only)
    upstream_port: int  # the demo upstream
    authz_grpc_port: int  # meshtoll's gRPC port
    authz_http_port: int  # meshtoll's HTTP ext_authz port
    stub_authz_port: int  # the authz stub's listener (envoy/authz-stub.yaml)


@dataclass(frozen=True, slots=True)
class StubPorts:
    """The ports of envoy/authz-stub.yaml, the Envoy that allows everything."""

    stub_admin_port: int
    stub_authz_port: int


@dataclass(frozen=True, slots=True)
class MtlsFiles:
    """PEM files for the mTLS listeners: client certificates must chain to `ca_cert`."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True, slots=True)
class MeshtollTlsFiles:
    """PEM files for TLS between Envoy and meshtoll's authz ports (gRPC and HTTP): meshtoll
    serves `server_cert`, which Envoy verifies against `ca_cert` (and its IP SAN 127.0.0.1);
    with `client_cert`, Envoy presents it and meshtoll requires one signed by `ca_cert` (mTLS)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path | None = None
    client_key: Path | None = None


# meshtoll's clusters and the protocol each speaks inside TLS (announced by ALPN).
_MESHTOLL_CLUSTERS = {"meshtoll_grpc": "h2", "meshtoll_http": "http/1.1"}
# meshtoll's clusters and the socket of `meshtoll serve --uds-dir` each reaches.
_MESHTOLL_SOCKETS = {"meshtoll_grpc": UDS_GRPC, "meshtoll_http": UDS_HTTP_AUTHZ}


def render_bootstrap(
    ports: EnvoyPorts,
    mtls: MtlsFiles | None = None,
    meshtoll_tls: MeshtollTlsFiles | None = None,
    meshtoll_sockets: Path | None = None,
    api_key_query_param: str | None = None,
    traces_port: int | None = None,
) -> str:
    """The local stack's Envoy bootstrap; the mTLS listeners only when `mtls` is given; TLS
    to meshtoll only when `meshtoll_tls` is; meshtoll reached through the Unix sockets
    `meshtoll serve --uds-dir` makes in `meshtoll_sockets` (plain text) when that is given;
    the policy's `auth.api_key_query_param` removed after every HTTP ext_authz filter when
    that is given (hidden_query_key);
    Envoy's own spans sent to the OTLP/HTTP collector on 127.0.0.1:`traces_port` when that is."""
    if meshtoll_tls is not None and meshtoll_sockets is not None:
        raise ValueError("meshtoll's Unix sockets speak plain text: no meshtoll_tls with meshtoll_sockets")
    text = read_template(LOCAL_TEMPLATE)
    values = _placeholders(asdict(ports))
    if mtls is not None:
        # Appended as text, not merged as data, so the fragment can use local.yaml's anchors.
        text += read_template(MTLS_TEMPLATE)
        values |= _placeholders(asdict(mtls))
    document = _document(Template(text).substitute(values))
    for cluster in document["static_resources"]["clusters"]:
        name = cluster["name"]
        if meshtoll_tls is not None and name in _MESHTOLL_CLUSTERS:
            cluster["transport_socket"] = _upstream_tls(meshtoll_tls, _MESHTOLL_CLUSTERS[name])
        if meshtoll_sockets is not None and name in _MESHTOLL_SOCKETS:
            (endpoints,) = cluster["load_assignment"]["endpoints"]
            (endpoint,) = endpoints["lb_endpoints"]
            path = meshtoll_sockets / _MESHTOLL_SOCKETS[name]
            endpoint["endpoint"]["address"] = {"pipe": {"path": str(path)}}
    if api_key_query_param is not None:
        for listener in document["static_resources"]["listeners"]:
            for chain in listener["filter_chains"]:
                for network_filter in chain["filters"]:
                    filters = network_filter["typed_config"].get("http_filters", [])
                    network_filter["typed_config"]["http_filters"] = with_hidden_query_key(
                        filters, api_key_query_param
                    )
    if traces_port is not None:
        _trace(document, traces_port)
    return _dump(document)


def _trace(document: dict[str, Any], port: int) -> None:
    """Every listener traces its requests (OpenTelemetry, sampling all of them) to the
    collector: the spans of the ext_authz and ext_proc calls carry their context to meshtoll."""
    provider = {
        "name": "envoy.tracers.opentelemetry",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
            "service_name": "envoy",
            "http_service": {
                "http_uri": {
                    "uri": f"http://127.0.0.1:{port}/v1/traces",
                    "cluster": "otel_collector",
                    "timeout": "1s",
                }
            },
        },
    }
    for listener in document["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                if network_filter["name"] == "envoy.filters.network.http_connection_manager":
                    network_filter["typed_config"]["tracing"] = {"provider": provider}
    document["static_resources"]["clusters"].append(
        {
            "name": "otel_collector",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": "otel_collector",
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {"address": "127.0.0.1", "port_value": port}
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
    )
    # Envoy sends its spans every 5 s, or 5 at a time: in the local stack, each one at once.
    runtime = {"tracing.opentelemetry.flush_interval_ms": 200, "tracing.opentelemetry.min_flush_spans": 1}
    document["layered_runtime"] = {"layers": [{"name": "traces", "static_layer": runtime}]}


HIDDEN_QUERY_KEY_FILTER = "meshtoll.hidden_query_key"


def with_hidden_query_key(http_filters: list[dict[str, Any]], parameter: str) -> list[dict[str, Any]]:
    """`http_filters` with the query parameter `parameter` removed right after each HTTP
    ext_authz filter: an HTTP authorization service cannot ask Envoy to remove a query
    parameter (the gRPC CheckResponse can), so the API key sent as one would reach the
    upstream. Static: it goes from every request of the listener, forwarded or not."""
    hidden = {
        "name": HIDDEN_QUERY_KEY_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"query_parameter_mutations": [{"remove": parameter}]},
        },
    }
    found: list[dict[str, Any]] = []
    for http_filter in http_filters:
        found.append(http_filter)
        if (
            http_filter["name"] == "envoy.filters.http.ext_authz"
            and "http_service" in http_filter["typed_config"]
        ):
            found.append(hidden)
    return found


def _upstream_tls(files: MeshtollTlsFiles, alpn: str) -> dict[str, Any]:
    common: dict[str, Any] = {
        "alpn_protocols": [alpn],
        "validation_context": {
            "trusted_ca": {"filename": str(files.ca_cert)},
            "match_typed_subject_alt_names": [{"san_type": "IP_ADDRESS", "matcher": {"exact": "127.0.0.1"}}],
        },
    }
    if files.client_cert is not None and files.client_key is not None:
        common["tls_certificates"] = [
            {
                "certificate_chain": {"filename": str(files.client_cert)},
                "private_key": {"filename": str(files.client_key)},
            }
        ]
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": common,
        },
    }


def render_authz_stub(ports: StubPorts) -> str:
    """The bootstrap of the Envoy that answers 200 to every authorization request."""
    return _resolve(Template(read_template(STUB_TEMPLATE)).substitute(_placeholders(asdict(ports))))


def read_template(name: str) -> str:
    return (resources.files("meshtoll") / "envoy" / name).read_text(encoding="utf-8")


def _placeholders(values: dict[str, Any]) -> dict[str, str]:
    # JSON scalars are YAML scalars: a path with spaces or colons stays one string.
    return {
        name: json.dumps(value if isinstance(value, int) else str(value)) for name, value in values.items()
    }


def _resolve(text: str) -> str:
    return _dump(_document(text))


def _document(text: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(text)
    for key in [key for key in document if key.startswith(_TEMPLATE_ONLY_PREFIX)]:
        del document[key]
    return document


def _dump(document: dict[str, Any]) -> str:
    return yaml.dump(document, Dumper=_PlainDumper, sort_keys=False, width=120)


class _PlainDumper(yaml.SafeDumper):
    """Writes shared blocks out in full: the output is for Envoy and for people, not a template."""

    def ignore_aliases(self, data: Any) -> bool:
        return True
