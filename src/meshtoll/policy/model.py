"""The tenant policy as plain, immutable values: what a validated document says."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from ipaddress import IPv4Network, IPv6Network
from typing import Literal

from meshtoll.api_keys import DEFAULT_KEY_PREFIX
from meshtoll.counting.limits import RateLimit

IPNetwork = IPv4Network | IPv6Network
TenantStatus = Literal["active", "suspended"]
TENANT_STATUSES: tuple[TenantStatus, ...] = ("active", "suspended")

HTTP_METHODS: frozenset[str] = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)

# Asymmetric algorithms only: a policy holds public keys, never shared secrets, so HS*
# (and `none`) can never verify a token, which also rules out RS/HS key confusion.
JWT_ALGORITHMS: frozenset[str] = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


EnforcedIn = Literal["authz", "service"]
ENFORCED_IN: tuple[EnforcedIn, ...] = ("authz", "service")
# When a fused decision's allowed response carries the RateLimit headers (a refusal always
# does): on every one, only when its most restrictive limit has a tenth or less left, never.
RateLimitHeaders = Literal["always", "near_limit", "never"]
RATELIMIT_HEADERS: tuple[RateLimitHeaders, ...] = ("always", "near_limit", "never")


PricingMode = Literal["graduated", "volume"]
PRICING_MODES: tuple[PricingMode, ...] = ("graduated", "volume")
# What a price is charged per: a calendar month or a calendar year, UTC.
BillingPeriod = Literal["month", "year"]
BILLING_PERIODS: tuple[BillingPeriod, ...] = ("month", "year")


# Money in a policy: a plain decimal of at most this many digits before and after the point.
# Enough for any price (a quintillion, a trillionth); invoicing relies on the bound to stay
# exact (see meter/pricing.py).
MONEY_INTEGER_DIGITS = 18
MONEY_FRACTION_DIGITS = 12


@dataclass(frozen=True, slots=True)
class Tier:
    up_to: int | None  # billable units (after the included ones) this tier reaches; None: no bound
    unit_price: Decimal


@dataclass(frozen=True, slots=True)
class Price:
    """A plan's price per billing period: the base fee, included units and tiers all count
    per period. Money is Decimal, always."""

    currency: str
    base_fee: Decimal = Decimal(0)
    included_units: int = 0
    mode: PricingMode = "graduated"
    tiers: tuple[Tier, ...] = ()
    period: BillingPeriod = "month"


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    limits: tuple[RateLimit, ...]
    price: Price | None = None
    meter: str | None = None  # the meter its requests count on in billing systems; None: the default
    # The API key goes on to the upstream (for every route); by default authz has Envoy
    # remove it: an upstream has no use for it, and a leaked upstream log would leak it.
    forward_credentials: bool = False


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    sha256: bytes
    revoked: bool = False
    expires_at: float | None = None  # Unix time from which the key is refused; None: never


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
class BillingAccounts:
    """A tenant's ids in the billing systems usage is delivered to; None: its own name."""

    stripe_customer: str | None = None
    lago_subscription: str | None = None
    openmeter_subject: str | None = None


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    plan: str
    status: TenantStatus = "active"
    api_keys: tuple[ApiKey, ...] = ()
    jwt: JwtSettings | None = None
    spiffe_ids: tuple[str, ...] = ()
    access: Access = field(default_factory=Access)
    limits: tuple[RateLimit, ...] | None = None  # None: the plan's limits
    billing: BillingAccounts = BillingAccounts()


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    # Where route limits are enforced unless a route says otherwise: in the authz call
    # itself (one hop) or by Envoy's ratelimit filter calling the rate-limit service.
    enforced_in: EnforcedIn = "authz"
    domain: str = "meshtoll"  # the RLS domain whose descriptors name tenants and routes
    headers: RateLimitHeaders = "always"  # RateLimit-* headers on fused decisions' allows


# What a header value template may name: `{tenant}` and so on, filled per request.
TEMPLATE_FIELDS: tuple[str, ...] = ("tenant", "plan", "consumer", "route")
DEFAULT_MAX_BODY_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class HeaderRules:
    """Header changes: `set` replaces, `append` adds a value, `remove` drops. Values are
    templates over TEMPLATE_FIELDS."""

    set: tuple[tuple[str, str], ...] = ()
    append: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.append or self.remove)


@dataclass(frozen=True, slots=True)
class Hooks:
    """What the ext_proc service does on a route. Only routes with hooks reach it at all."""

    request_headers: HeaderRules = HeaderRules()
    response_headers: HeaderRules = HeaderRules()
    # A JSON field path into the response body ("usage.total_tokens"): its number is the
    # request's billable units. None: the route's cost.
    usage_from_body: tuple[str, ...] | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # bodies longer than this are not read
    # When the ext_proc service cannot be reached: pass the request (metering hooks) or fail
    # it with 503 (hooks that are part of the policy, such as header changes).
    failure_mode_allow: bool = True


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    rule: RouteRule
    cost: int = 1
    limits: tuple[RateLimit, ...] = ()  # per tenant, on top of the tenant's own limits
    enforced_in: EnforcedIn | None = None  # None: RateLimitSettings.enforced_in
    hooks: Hooks | None = None
    meter: str | None = None  # the meter its requests count on, before the plan's; None: the plan's
    forward_credentials: bool = False  # the API key goes on to the upstream on this route
    # Paths with `%25` and two hex digits (a double-encoded character) pass on this route;
    # elsewhere they are refused (an upstream that decodes twice reads `%252e` as `.`).
    allow_double_encoding: bool = False


@dataclass(frozen=True, slots=True)
class AuthSettings:
    api_key_header: str = "x-api-key"
    api_key_query_param: str | None = None
    api_key_prefix: str = DEFAULT_KEY_PREFIX  # of the keys meshtoll makes (meshtoll.api_keys)
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
    ratelimit: RateLimitSettings = field(default_factory=RateLimitSettings)
