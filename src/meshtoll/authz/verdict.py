"""What goes into an authz decision and what comes out, as plain values."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from meshtoll.ratelimit.verdict import RateLimitState
from meshtoll.wire import REQUEST_ID_HEADER

Headers = tuple[tuple[str, str], ...]


class CheckRequest(NamedTuple):
    """The request attributes a decision needs, whichever transport brought them. A named
    tuple, as Allow: built per decision, immutable, without a frozen dataclass's cost."""

    method: str
    path: str  # as sent, query string included
    headers: Mapping[str, str]  # names lower-case
    source_address: str  # the downstream peer as Envoy saw it
    peer_uri_sans: tuple[str, ...] = ()  # URI SANs of a verified client certificate

    @property
    def request_id(self) -> str:
        return self.headers.get(REQUEST_ID_HEADER, "")


class Allow(NamedTuple):
    """A named tuple, not a frozen dataclass: one is built per admitted request (two when
    limits add their headers), and a frozen dataclass sets each field through
    object.__setattr__, five times the cost of a tuple (timeit, 9 fields)."""

    tenant: str
    plan: str
    consumer: str
    route: str
    headers: Headers  # set on the upstream request, replacing any value the client sent
    # Removed from the upstream request: client-sent x-meshtoll-* headers meshtoll does not
    # set, and the header that carried the API key
    remove_headers: tuple[str, ...]
    metadata: Mapping[str, str]  # dynamic metadata for rate-limit descriptors and access logs
    # The RateLimit headers added to the client's response (None: none); each transport
    # writes them in its own form.
    rate_limit: RateLimitState | None = None
    # Query parameters removed from the upstream request (an API key sent as one); only the
    # gRPC transport can ask Envoy for that (see authz/http_transport.py).
    remove_query_params: tuple[str, ...] = ()


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


def decision_attributes(verdict: Verdict, request_id: str) -> dict[str, str]:
    """A decision as its trace span carries it (telemetry/tracing.py)."""
    if isinstance(verdict, Deny):
        return {
            "meshtoll.outcome": "deny",
            "meshtoll.reason": verdict.code,
            "meshtoll.request_id": request_id,
        }
    return {
        "meshtoll.outcome": "allow",
        "meshtoll.request_id": request_id,
        "meshtoll.tenant": verdict.tenant,
        "meshtoll.plan": verdict.plan,
        "meshtoll.route": verdict.route,
    }
