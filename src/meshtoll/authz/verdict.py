"""What goes into an authz decision and what comes out, as plain values."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

# The one place that knows the names of meshtoll's identity headers.
HEADER_PREFIX = "x-meshtoll-"
TENANT_HEADER = "x-meshtoll-tenant"
PLAN_HEADER = "x-meshtoll-plan"
CONSUMER_HEADER = "x-meshtoll-consumer"
ROUTE_HEADER = "x-meshtoll-route"
# Marks a request for Envoy's ext_proc filter: "open" or "closed", the failure mode of the
# route's hooks (one ext_proc filter instance per mode matches on it). Absent: no hooks.
EXTPROC_HEADER = "x-meshtoll-extproc"
# Envoy's own request id (generated at the edge): the key that ties an admission, a body
# hook's units and the access-log record of one request together.
REQUEST_ID_HEADER = "x-request-id"
# Set by Envoy (never by the client) on the HTTP authz request: the downstream peer address.
PEER_ADDRESS_HEADER = "x-meshtoll-peer-address"
IDENTITY_HEADERS = frozenset({TENANT_HEADER, PLAN_HEADER, CONSUMER_HEADER, ROUTE_HEADER, EXTPROC_HEADER})
# The same identity as dynamic metadata of a gRPC allow, which Envoy files under its
# ext_authz filter's namespace, where the access log (and so the meter) finds it too.
AUTHZ_METADATA_NAMESPACE = "envoy.filters.http.ext_authz"
TENANT_KEY, PLAN_KEY, CONSUMER_KEY, ROUTE_KEY = "tenant", "plan", "consumer", "route"

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class CheckRequest:
    """The request attributes a decision needs, whichever transport brought them."""

    method: str
    path: str  # as sent, query string included
    headers: Mapping[str, str]  # names lower-case
    source_address: str  # the downstream peer as Envoy saw it
    peer_uri_sans: tuple[str, ...] = ()  # URI SANs of a verified client certificate

    @property
    def request_id(self) -> str:
        return self.headers.get(REQUEST_ID_HEADER, "")


@dataclass(frozen=True, slots=True)
class Allow:
    tenant: str
    plan: str
    consumer: str
    route: str
    headers: Headers  # set on the upstream request, replacing any value the client sent
    remove_headers: tuple[str, ...]  # client-sent x-meshtoll-* headers meshtoll does not set
    metadata: Mapping[str, str]  # dynamic metadata for rate-limit descriptors and access logs
    response_headers: Headers = ()  # added to the client's response (RateLimit-*)


@dataclass(frozen=True, slots=True)
class Deny:
    status: int
    code: str  # stable, machine-readable: clients may switch on it
    message: str
    headers: Headers = ()

    def body(self, request_id: str) -> bytes:
        document = {"error": self.code, "message": self.message, "request_id": request_id}
        return json.dumps(document, separators=(",", ":")).encode()


Verdict = Allow | Deny
