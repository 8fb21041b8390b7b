"""The tenant policy as plain, immutable values: what a validated document says."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Literal

IPNetwork = IPv4Network | IPv6Network
TenantStatus = Literal["active", "suspended"]

# Fixed-length periods in seconds; month and year are calendar periods (UTC) whose length
# depends on the date, so they have no entry here.
PERIOD_SECONDS: dict[str, int] = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "week": 7 * 86400,
}
PERIODS: tuple[str, ...] = (*PERIOD_SECONDS, "month", "year")

HTTP_METHODS: frozenset[str] = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)

# Asymmetric algorithms only: a policy holds public keys, never shared secrets, so HS*
# (and `none`) can never verify a token, which also rules out RS/HS key confusion.
JWT_ALGORITHMS: frozenset[str] = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


@dataclass(frozen=True, slots=True)
class Limit:
    requests: int
    per: str
    name: str


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    limits: tuple[Limit, ...]


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    sha256: bytes
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class JwtSettings:
    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...]
    jwks: dict[str, object] | None
    jwks_uri: str | None
    consumer_claim: str = "sub"
    match_claims: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class RouteRule:
    """A path matcher with an optional method allow-list (empty: every method)."""

    path: str
    exact: bool
    methods: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Access:
    ip: tuple[IPNetwork, ...] = ()
    routes: tuple[RouteRule, ...] | None = None  # None: every route


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    plan: str
    status: TenantStatus = "active"
    api_keys: tuple[ApiKey, ...] = ()
    jwt: JwtSettings | None = None
    spiffe_ids: tuple[str, ...] = ()
    access: Access = field(default_factory=Access)


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    rule: RouteRule
    cost: int = 1


@dataclass(frozen=True, slots=True)
class AuthSettings:
    api_key_header: str = "x-api-key"
    api_key_query_param: str | None = None
    trusted_proxy_hops: int = 0
    jwt_leeway_seconds: int = 30
    jwks_refresh_seconds: int = 300


@dataclass(frozen=True, slots=True)
class Policy:
    source: str
    auth: AuthSettings
    plans: dict[str, Plan]
    tenants: dict[str, Tenant]
    routes: tuple[Route, ...]
