"""The few parameters every rendered deployment file derives from."""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshtoll.errors import ConfigError
from meshtoll.settings import Settings

# Filter-level `rate_limits` (ratelimit filter) and ext_proc's `status_on_error` are newer
# than the go-control-plane of Istio 1.27; istiod drops fields it does not know with a
# warning, so on 1.27 `enforced_in: service` routes would go unlimited and closed hooks
# would lose their 503. 1.28 is the first release that keeps both.
MINIMUM_ISTIO = (1, 28)
# The Envoy of the official image in docker-compose.yml: the version the default suite runs.
ENVOY_IMAGE = "envoyproxy/envoy:v1.40.0"
# A Kubernetes label value or DNS-1123 name, as the API server checks them.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_QUERY_PARAMETER = re.compile(r"^[A-Za-z0-9._~-]{1,64}$")
_DEFAULTS = Settings()


@dataclass(frozen=True, slots=True)
class DeployParams:
    namespace: str = "meshtoll"
    gateway_namespace: str = "istio-system"
    # How Istio resources find the gateway: a workload label (an istioctl-installed gateway
    # is `istio=ingressgateway`; the Helm chart labels it `istio=<release minus "istio-">`,
    # usually `istio=ingress`), or the name of a Gateway API Gateway (then `targetRefs`).
    gateway_selector: tuple[str, str] = ("istio", "ingressgateway")
    gateway_ref: str | None = None
    # The gateway pods' service account, for the in-mesh AuthorizationPolicy; by default the
    # istioctl gateway's, or `<name>-istio` for a Gateway API Gateway Istio deploys.
    gateway_service_account: str | None = None
    service: str | None = None  # meshtoll's Service FQDN; default meshtoll.<namespace>.svc.cluster.local
    grpc_port: int = _DEFAULTS.grpc_port
    http_authz_port: int = _DEFAULTS.http_authz_port
    admin_port: int = _DEFAULTS.admin_port
    istio_version: str = "1.28"
    # Which ext_authz provider the gateway's AuthorizationPolicy names: the HTTP fast path,
    # or gRPC (about 1.4 times the CPU per call; for setups that standardise on it).
    authz_transport: str = "http"
    # The plain Envoy (deploy/envoy, docker-compose.yml): where it listens and the host
    # names it reaches meshtoll and the upstream by.
    listen_port: int = 8080
    meshtoll_host: str = "meshtoll"
    upstream_host: str = "upstream"
    upstream_port: int = 8000
    image: str = "meshtoll:0.1.0"
    envoy_image: str = ENVOY_IMAGE
    # The policy's auth.api_key_query_param, if it has one: the gateway removes it after HTTP
    # ext_authz, since an HTTP authorization service cannot ask Envoy to.
    api_key_query_param: str | None = None
    # The OpenTelemetry collector (OTLP over gRPC) Envoy and meshtoll send their spans to: a
    # host name (docker-compose's service; in Kubernetes, the collector Service's FQDN).
    collector_host: str = "otel-collector"
    collector_port: int = 4317
    # The share of requests Envoy starts a trace for (a client's sampled traceparent is
    # always followed); meshtoll follows Envoy's decision (parentbased_traceidratio).
    trace_sampling_percent: float = 1.0

    def __post_init__(self) -> None:
        for name in ("namespace", "gateway_namespace"):
            if not _NAME.match(getattr(self, name)):
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not a Kubernetes namespace name")
        if self.gateway_ref is not None and not _NAME.match(self.gateway_ref):
            raise ConfigError(f"gateway_ref: {self.gateway_ref!r} is not a Kubernetes object name")
        key, value = self.gateway_selector
        if not key or not _LABEL.match(value):
            raise ConfigError(f"gateway_selector: {key}={value} is not a label key=value")
        if not 0 <= self.trace_sampling_percent <= 100:
            raise ConfigError(f"trace_sampling_percent: {self.trace_sampling_percent} is not 0-100")
        for name in (
            "grpc_port",
            "http_authz_port",
            "admin_port",
            "listen_port",
            "upstream_port",
            "collector_port",
        ):
            if not 1 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{name}: {getattr(self, name)} is not a TCP port (1-65535)")
        if self.api_key_query_param is not None and not _QUERY_PARAMETER.match(self.api_key_query_param):
            raise ConfigError(
                f"api_key_query_param: {self.api_key_query_param!r} is not a query parameter name"
            )
        if self.authz_transport not in ("http", "grpc"):
            raise ConfigError(f"authz_transport: {self.authz_transport!r} is not one of http, grpc")
        if self.istio_minor < MINIMUM_ISTIO:
            raise ConfigError(
                f"istio_version: {self.istio_version} is older than {'.'.join(map(str, MINIMUM_ISTIO))}, "
                "whose istiod drops the ratelimit filter's rate_limits and ext_proc's status_on_error"
            )

    @property
    def istio_minor(self) -> tuple[int, int]:
        match = re.match(r"^(\d+)\.(\d+)(\.\d+)?$", self.istio_version)
        if match is None:
            raise ConfigError(f"istio_version: {self.istio_version!r} is not a version such as 1.28")
        return int(match[1]), int(match[2])

    @property
    def service_fqdn(self) -> str:
        return self.service or f"meshtoll.{self.namespace}.svc.cluster.local"

    @property
    def gateway_principal(self) -> str:
        account = self.gateway_service_account
        if account is None:
            account = "istio-ingressgateway" if self.gateway_ref is None else f"{self.gateway_ref}-istio"
        return f"cluster.local/ns/{self.gateway_namespace}/sa/{account}"

    @property
    def gateway_pod_labels(self) -> dict[str, str]:
        """The labels of the gateway's pods (Istio labels a Gateway API Gateway's own)."""
        if self.gateway_ref is not None:
            return {"gateway.networking.k8s.io/gateway-name": self.gateway_ref}
        key, value = self.gateway_selector
        return {key: value}

    def cluster(self, port: int) -> str:
        """The name istiod gives the gateway's cluster for a port of meshtoll's Service."""
        return f"outbound|{port}||{self.service_fqdn}"


def parse_selector(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key or not value:
        raise ConfigError(f"--gateway-selector: {text!r} is not key=value (e.g. istio=ingress)")
    return key, value
