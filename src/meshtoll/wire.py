"""The contract between Envoy and meshtoll's services, in one place: the headers authz sets
and Envoy forwards, the dynamic-metadata namespaces and keys the filters and loggers read,
and which responses are billable. Every service imports these names; none defines its own.
"""

from __future__ import annotations

# The identity headers authz sets on an admitted request. Envoy removes any a client sent
# (early_header_mutation_extensions) before routing, so upstreams may trust them.
HEADER_PREFIX = "x-meshtoll-"
TENANT_HEADER = "x-meshtoll-tenant"
PLAN_HEADER = "x-meshtoll-plan"
CONSUMER_HEADER = "x-meshtoll-consumer"
ROUTE_HEADER = "x-meshtoll-route"
# Marks a request for Envoy's ext_proc filter: "open" or "closed", the failure mode of the
# route's hooks (one ext_proc filter instance per mode matches on it). Absent: no hooks.
EXTPROC_HEADER = "x-meshtoll-extproc"
IDENTITY_HEADERS = frozenset({TENANT_HEADER, PLAN_HEADER, CONSUMER_HEADER, ROUTE_HEADER, EXTPROC_HEADER})
# Envoy's own request id (generated at the edge): the key that ties an admission, a body
# hook's units and the access-log record of one request together.
REQUEST_ID_HEADER = "x-request-id"
# Set by Envoy (never by the client) on the HTTP authz request: the downstream peer address.
PEER_ADDRESS_HEADER = "x-meshtoll-peer-address"

# The identity of a gRPC allow as dynamic metadata, which Envoy files under its ext_authz
# filter's namespace, where the access log (and so the meter) finds it too.
AUTHZ_METADATA_NAMESPACE = "envoy.filters.http.ext_authz"
TENANT_KEY, PLAN_KEY, CONSUMER_KEY, ROUTE_KEY = "tenant", "plan", "consumer", "route"

# Where a hook's units land in Envoy's dynamic metadata: %DYNAMIC_METADATA(meshtoll:units)%,
# read by the access log (so the meter) and by the rate-limit filter's charge after the
# response, whose descriptor carries the entry (CHARGE_KEY, CHARGE_UNITS).
METADATA_NAMESPACE = "meshtoll"
UNITS_KEY = "units"
CHARGE_KEY = "charge"
CHARGE_UNITS = "units"


def is_billable_status(status: int) -> bool:
    """Only a request that succeeded is billed its units; refused and failed ones bill 0."""
    return 200 <= status < 400


def is_envoys_own_failure(status: int) -> bool:
    """Whether a request logged without authz's tenant may still be one authz allowed:
    Envoy answers it 5xx itself when the allow does not reach it in time (ext_authz's
    status_on_error, 503 in every configuration meshtoll ships), and logs 0 when the
    client left before any answer. authz refuses with 4xx (and with 503 only while it
    cannot decide)."""
    return status == 0 or status >= 500
