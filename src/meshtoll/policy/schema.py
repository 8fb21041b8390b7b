"""The policy document's schema: plain values from a Document in, a Policy model out."""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Mapping

from meshtoll.api_keys import KEY_PREFIX_PATTERN
from meshtoll.counting.limits import ALGORITHMS, Counted, RateLimit
from meshtoll.counting.periods import PERIOD_SECONDS, PERIODS
from meshtoll.policy.billing import billing_accounts, meter_name
from meshtoll.policy.document import Document, FieldPath
from meshtoll.policy.fields import Fields
from meshtoll.policy.model import (
    BILLING_PERIODS,
    DEFAULT_MAX_BODY_BYTES,
    ENFORCED_IN,
    HTTP_METHODS,
    JWT_ALGORITHMS,
    PRICING_MODES,
    RATELIMIT_HEADERS,
    TEMPLATE_FIELDS,
    TENANT_STATUSES,
    Access,
    ApiKey,
    AuthSettings,
    BillingAccounts,
    HeaderRules,
    Hooks,
    IPNetwork,
    JwtSettings,
    Plan,
    Policy,
    Price,
    RateLimitSettings,
    Route,
    RouteRule,
    Tenant,
    Tier,
)

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def build_policy(document: Document) -> Policy:
    """Validate the whole document; every problem is recorded on `document`."""
    fields = Fields(document)
    sections = ("auth", "ratelimit", "plans", "tenants", "routes")
    root = fields.mapping(document.root, (), optional=sections) or {}
    auth = _auth(fields, root.get("auth"), ("auth",))
    ratelimit = _ratelimit_settings(fields, root.get("ratelimit"), ("ratelimit",))
    plans = {
        name: plan
        for name, value, path in fields.entries(root.get("plans"), ("plans",))
        if (plan := _plan(fields, name, value, path)) is not None
    }
    tenants: dict[str, Tenant] = {}
    for name, value, path in fields.entries(root.get("tenants"), ("tenants",)):
        tenant = _tenant(fields, name, value, path, plans)
        if tenant is not None:
            tenants[name] = tenant
    routes = tuple(
        route
        for value, path in fields.items(root.get("routes"), ("routes",))
        if (route := _route(fields, value, path)) is not None
    )
    return Policy(document.file, auth, plans, tenants, routes, ratelimit)


def _auth(fields: Fields, value: object, path: FieldPath) -> AuthSettings:
    defaults = AuthSettings()
    if value is None:
        return defaults
    known = ("api_key_header", "api_key_query_param", "api_key_prefix", "trusted_proxy_hops")
    raw = fields.mapping(value, path, optional=(*known, "jwt_leeway_seconds", "jwks_refresh_seconds")) or {}
    header = raw.get("api_key_header", defaults.api_key_header)
    if not isinstance(header, str) or not _HEADER_NAME.fullmatch(header):
        fields.problem((*path, "api_key_header"), f"{header!r} is not an HTTP header name")
        header = defaults.api_key_header
    query = raw.get("api_key_query_param")
    if query is not None:
        query = fields.string(query, (*path, "api_key_query_param"))
    prefix = raw.get("api_key_prefix", defaults.api_key_prefix)
    if not isinstance(prefix, str) or not KEY_PREFIX_PATTERN.fullmatch(prefix):
        message = "lower-case letters and digits, in up to three words joined by '_' (e.g. mt_live)"
        fields.problem((*path, "api_key_prefix"), f"{prefix!r} is not a key prefix: {message}")
        prefix = defaults.api_key_prefix

    def number(key: str, default: int, minimum: int) -> int:
        if key not in raw:
            return default
        found = fields.integer(raw[key], (*path, key), minimum=minimum)
        return default if found is None else found

    return AuthSettings(
        api_key_header=header.lower(),
        api_key_query_param=query,
        api_key_prefix=prefix,
        trusted_proxy_hops=number("trusted_proxy_hops", defaults.trusted_proxy_hops, 0),
        jwt_leeway_seconds=number("jwt_leeway_seconds", defaults.jwt_leeway_seconds, 0),
        jwks_refresh_seconds=number("jwks_refresh_seconds", defaults.jwks_refresh_seconds, 1),
    )


def name_problem(name: str) -> str | None:
    """What is wrong with a plan's or tenant's name, if anything."""
    if _NAME.fullmatch(name):
        return None
    return f"{name[:140]!r} is not a valid name (letters, digits, '.', '_', '-'; at most 128)"


def _name(fields: Fields, name: str, path: FieldPath) -> bool:
    problem = name_problem(name)
    if problem is not None:
        fields.problem(path, problem)
    return problem is None


def _plan(fields: Fields, name: str, value: object, path: FieldPath) -> Plan | None:
    raw = fields.mapping(value, path, optional=("limits", "price", "meter", "forward_credentials"))
    if raw is None or not _name(fields, name, path):
        return None
    price = _price(fields, raw["price"], (*path, "price")) if "price" in raw else None
    meter = meter_name(fields, raw["meter"], (*path, "meter")) if "meter" in raw else None
    forward = fields.boolean(raw.get("forward_credentials", False), (*path, "forward_credentials"))
    return Plan(name, _limits(fields, raw.get("limits"), (*path, "limits")), price, meter, bool(forward))


def _price(fields: Fields, value: object, path: FieldPath) -> Price | None:
    optional = ("period", "base_fee", "included_units", "mode", "tiers")
    raw = fields.mapping(value, path, required=("currency",), optional=optional)
    if raw is None or "currency" not in raw:
        return None
    currency = raw["currency"]
    if not (isinstance(currency, str) and _CURRENCY.fullmatch(currency)):
        fields.problem((*path, "currency"), f"{currency!r} is not an ISO 4217 code such as EUR or USD")
    period = fields.choice(raw.get("period", "month"), (*path, "period"), BILLING_PERIODS)
    base_fee = fields.money(raw.get("base_fee", "0"), (*path, "base_fee"))
    included = fields.integer(raw.get("included_units", 0), (*path, "included_units"))
    mode = fields.choice(raw.get("mode", "graduated"), (*path, "mode"), PRICING_MODES)
    tiers = _tiers(fields, raw.get("tiers"), (*path, "tiers"))
    if not isinstance(currency, str) or base_fee is None or included is None:
        return None
    if mode is None or tiers is None or period is None:
        return None
    return Price(currency, base_fee, included, mode, tiers, period)


def _tiers(fields: Fields, value: object, path: FieldPath) -> tuple[Tier, ...] | None:
    tiers: list[Tier] = []
    for item, item_path in fields.items(value, path):
        raw = fields.mapping(item, item_path, required=("up_to", "unit_price"))
        if raw is None or "up_to" not in raw or "unit_price" not in raw:
            return None
        up_to = (
            None if raw["up_to"] is None else fields.integer(raw["up_to"], (*item_path, "up_to"), minimum=1)
        )
        price = fields.money(raw["unit_price"], (*item_path, "unit_price"))
        if price is None or (raw["up_to"] is not None and up_to is None):
            return None
        if tiers and (tiers[-1].up_to is None or (up_to is not None and up_to <= tiers[-1].up_to)):
            fields.problem(
                (*item_path, "up_to"), "tiers must rise: each up_to above the one before, null last"
            )
            return None
        tiers.append(Tier(up_to, price))
    if not tiers:
        fields.problem(path, 'at least one tier is required (e.g. [{up_to: null, unit_price: "0.001"}])')
        return None
    if tiers[-1].up_to is not None:
        fields.problem(
            (*path, len(tiers) - 1, "up_to"), "the last tier needs up_to: null, so every unit has a price"
        )
        return None
    return tuple(tiers)


def _limits(fields: Fields, value: object, path: FieldPath) -> tuple[RateLimit, ...]:
    limits = tuple(
        limit for item, item_path in fields.items(value, path) if (limit := _limit(fields, item, item_path))
    )
    seen: set[str] = set()
    for index, limit in enumerate(limits):
        if limit.name in seen:
            fields.problem((*path, index), f"two limits are named {limit.name!r}: give one a distinct 'name'")
        seen.add(limit.name)
    return limits


def _limit(fields: Fields, value: object, path: FieldPath) -> RateLimit | None:
    optional = ("requests", "units", "name", "algorithm", "burst", "shadow")
    raw = fields.mapping(value, path, required=("per",), optional=optional)
    if raw is None or "per" not in raw:
        return None
    if ("requests" in raw) == ("units" in raw):
        fields.problem(path, "exactly one of 'requests' or 'units' is required")
        return None
    counts: Counted = "requests" if "requests" in raw else "units"
    amount = fields.integer(raw[counts], (*path, counts))
    per = fields.choice(raw["per"], (*path, "per"), PERIODS)
    algorithm = fields.choice(raw.get("algorithm", "fixed_window"), (*path, "algorithm"), ALGORITHMS)
    burst = fields.integer(raw["burst"], (*path, "burst"), minimum=1) if "burst" in raw else None
    shadow = fields.boolean(raw.get("shadow", False), (*path, "shadow"))
    name = fields.string(raw["name"], (*path, "name")) if "name" in raw else None
    if algorithm != "token_bucket" and "burst" in raw:
        fields.problem((*path, "burst"), "only a token_bucket limit has a burst")
    if algorithm == "token_bucket" and per is not None and per not in PERIOD_SECONDS:
        # A bucket refills at a constant rate; a calendar month has no constant length.
        fields.problem((*path, "per"), f"a token_bucket needs a fixed period, not {per!r}")
    if amount is None or per is None or algorithm is None or shadow is None:
        return None
    default_name = f"{amount}/{per}" if counts == "requests" else f"{amount}_units/{per}"
    return RateLimit(amount, per, algorithm, burst, name or default_name, shadow, counts)


def _ratelimit_settings(fields: Fields, value: object, path: FieldPath) -> RateLimitSettings:
    defaults = RateLimitSettings()
    if value is None:
        return defaults
    raw = fields.mapping(value, path, optional=("enforced_in", "domain", "headers")) or {}
    enforced_in = fields.choice(
        raw.get("enforced_in", defaults.enforced_in), (*path, "enforced_in"), ENFORCED_IN
    )
    domain = fields.string(raw.get("domain", defaults.domain), (*path, "domain"))
    headers = raw.get("headers", defaults.headers)
    if isinstance(headers, bool):  # what the setting was before near_limit
        headers = "always" if headers else "never"
    headers = fields.choice(headers, (*path, "headers"), RATELIMIT_HEADERS)
    return RateLimitSettings(
        enforced_in=enforced_in or defaults.enforced_in,
        domain=domain or defaults.domain,
        headers=defaults.headers if headers is None else headers,
    )


def build_tenant(
    document: Document, name: str, value: object, path: FieldPath, plans: Mapping[str, Plan]
) -> Tenant | None:
    """One tenant's mapping, validated as the file's `tenants.<name>` is (the same rules and
    messages, problems recorded on `document` at `path`): how run-time tenants are checked."""
    return _tenant(Fields(document), name, value, path, plans)


def _tenant(
    fields: Fields, name: str, value: object, path: FieldPath, plans: Mapping[str, Plan]
) -> Tenant | None:
    optional = ("status", "api_keys", "jwt", "mtls", "allow", "limits", "billing")
    raw = fields.mapping(value, path, required=("plan",), optional=optional)
    if raw is None or not _name(fields, name, path) or "plan" not in raw:
        return None
    plan = fields.string(raw["plan"], (*path, "plan"))
    if plan is not None and plan not in plans:
        known = ", ".join(sorted(plans)) or "none defined"
        fields.problem((*path, "plan"), f"unknown plan {plan!r} (plans: {known})")
    status = fields.choice(raw.get("status", "active"), (*path, "status"), TENANT_STATUSES)
    api_keys = tuple(
        key
        for item, item_path in fields.items(raw.get("api_keys"), (*path, "api_keys"))
        if (key := _api_key(fields, item, item_path)) is not None
    )
    jwt = _jwt(fields, raw["jwt"], (*path, "jwt")) if "jwt" in raw else None
    spiffe_ids: tuple[str, ...] = ()
    if "mtls" in raw:
        mtls = fields.mapping(raw["mtls"], (*path, "mtls"), required=("spiffe_ids",)) or {}
        spiffe_ids = fields.strings(mtls.get("spiffe_ids"), (*path, "mtls", "spiffe_ids"))
        for index, spiffe_id in enumerate(spiffe_ids):
            if not spiffe_id.startswith("spiffe://"):
                fields.problem((*path, "mtls", "spiffe_ids", index), f"{spiffe_id!r} is not a spiffe:// URI")
    access = _access(fields, raw["allow"], (*path, "allow")) if "allow" in raw else Access()
    limits = _limits(fields, raw["limits"], (*path, "limits")) if "limits" in raw else None
    billing = BillingAccounts()
    if "billing" in raw:
        billing = billing_accounts(fields, raw["billing"], (*path, "billing"))
    if plan is None or status is None:
        return None
    return Tenant(name, plan, status, api_keys, jwt, spiffe_ids, access, limits, billing)


def _api_key(fields: Fields, value: object, path: FieldPath) -> ApiKey | None:
    raw = fields.mapping(value, path, required=("id", "sha256"), optional=("revoked",))
    if raw is None or "id" not in raw or "sha256" not in raw:
        return None
    key_id = fields.string(raw["id"], (*path, "id"))
    digest = raw["sha256"]
    if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
        fields.problem((*path, "sha256"), "expected 64 lowercase hex digits (the SHA-256 of the key)")
        return None
    revoked = fields.boolean(raw.get("revoked", False), (*path, "revoked"))
    if key_id is None or revoked is None:
        return None
    return ApiKey(key_id, bytes.fromhex(digest), revoked)


def _jwt(fields: Fields, value: object, path: FieldPath) -> JwtSettings | None:
    optional = ("audiences", "algorithms", "jwks", "jwks_uri", "consumer_claim", "match_claims")
    raw = fields.mapping(value, path, required=("issuer",), optional=optional)
    if raw is None or "issuer" not in raw:
        return None
    issuer = fields.string(raw["issuer"], (*path, "issuer"))
    audiences = fields.strings(raw.get("audiences"), (*path, "audiences"))
    algorithms = fields.strings(raw.get("algorithms", ["RS256"]), (*path, "algorithms"))
    for index, algorithm in enumerate(algorithms):
        if algorithm not in JWT_ALGORITHMS:
            fields.problem(
                (*path, "algorithms", index),
                f"{algorithm!r} is not allowed (asymmetric only: {', '.join(sorted(JWT_ALGORITHMS))})",
            )
    jwks = raw.get("jwks")
    jwks_uri = fields.string(raw["jwks_uri"], (*path, "jwks_uri")) if "jwks_uri" in raw else None
    if (jwks is None) == (jwks_uri is None):
        fields.problem(path, "exactly one of 'jwks' or 'jwks_uri' is required")
    if jwks is not None and not (isinstance(jwks, dict) and isinstance(jwks.get("keys"), list)):
        fields.problem((*path, "jwks"), "expected a JWK Set: a mapping with a 'keys' list")
        jwks = None
    if jwks_uri is not None and not jwks_uri.startswith(("https://", "http://")):
        fields.problem((*path, "jwks_uri"), f"{jwks_uri!r} is not an http(s) URL")
    consumer_claim = fields.string(raw.get("consumer_claim", "sub"), (*path, "consumer_claim"))
    match_claims: list[tuple[str, str]] = []
    for claim, claim_value, claim_path in fields.entries(raw.get("match_claims"), (*path, "match_claims")):
        text = fields.string(claim_value, claim_path)
        if text is not None:
            match_claims.append((claim, text))
    if issuer is None or consumer_claim is None:
        return None
    return JwtSettings(issuer, audiences, algorithms, jwks, jwks_uri, consumer_claim, tuple(match_claims))


def _access(fields: Fields, value: object, path: FieldPath) -> Access:
    raw = fields.mapping(value, path, optional=("ip", "routes")) or {}
    networks: list[IPNetwork] = []
    for item, item_path in fields.items(raw.get("ip"), (*path, "ip")):
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            fields.problem(item_path, f"{item!r} is not a CIDR")
    routes: tuple[RouteRule, ...] | None = None
    if "routes" in raw:
        routes = tuple(
            rule
            for item, item_path in fields.items(raw["routes"], (*path, "routes"))
            if (rule := _route_rule(fields, item, item_path, with_methods=True)) is not None
        )
    return Access(tuple(networks), routes)


def _route(fields: Fields, value: object, path: FieldPath) -> Route | None:
    rule = _route_rule(fields, value, path, with_methods=False)
    if rule is None or not isinstance(value, dict):
        return None
    cost = fields.integer(value.get("cost", 1), (*path, "cost"))
    name = fields.string(value["name"], (*path, "name")) if "name" in value else rule.path
    limits = _limits(fields, value.get("limits"), (*path, "limits"))
    enforced_in = None
    if "enforced_in" in value:
        enforced_in = fields.choice(value["enforced_in"], (*path, "enforced_in"), ENFORCED_IN)
    hooks = _hooks(fields, value["hooks"], (*path, "hooks")) if "hooks" in value else None
    meter = meter_name(fields, value["meter"], (*path, "meter")) if "meter" in value else None
    forward = fields.boolean(value.get("forward_credentials", False), (*path, "forward_credentials"))
    double_encoding = fields.boolean(
        value.get("allow_double_encoding", False), (*path, "allow_double_encoding")
    )
    if cost is None or name is None or forward is None or double_encoding is None:
        return None
    return Route(name, rule, cost, limits, enforced_in, hooks, meter, forward, double_encoding)


def _hooks(fields: Fields, value: object, path: FieldPath) -> Hooks | None:
    known = ("request_headers", "response_headers", "usage_from_body", "max_body_bytes", "failure_mode_allow")
    raw = fields.mapping(value, path, optional=known)
    if raw is None:
        return None
    if not raw:
        fields.problem(path, f"no hook given (expected some of: {', '.join(known)})")
        return None
    request_headers = _header_rules(fields, raw.get("request_headers"), (*path, "request_headers"))
    response_headers = _header_rules(fields, raw.get("response_headers"), (*path, "response_headers"))
    usage: tuple[str, ...] | None = None
    if "usage_from_body" in raw:
        text = fields.string(raw["usage_from_body"], (*path, "usage_from_body"))
        if text is not None:
            usage = tuple(text.split("."))
            if not all(usage):
                fields.problem((*path, "usage_from_body"), f"{text!r} is not a dotted field path")
    max_body = fields.integer(
        raw.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES), (*path, "max_body_bytes"), minimum=1
    )
    if "max_body_bytes" in raw and usage is None:
        fields.problem((*path, "max_body_bytes"), "only 'usage_from_body' reads a body")
    # Metering must never fail a request; a header change the policy asks for must happen.
    default_allow = not (request_headers or response_headers)
    allow = fields.boolean(raw.get("failure_mode_allow", default_allow), (*path, "failure_mode_allow"))
    if max_body is None or allow is None:
        return None
    return Hooks(request_headers, response_headers, usage, max_body, allow)


def _header_rules(fields: Fields, value: object, path: FieldPath) -> HeaderRules:
    if value is None:
        return HeaderRules()
    raw = fields.mapping(value, path, optional=("set", "append", "remove")) or {}

    def templates(key: str) -> tuple[tuple[str, str], ...]:
        found: list[tuple[str, str]] = []
        for name, template, item_path in fields.entries(raw.get(key), (*path, key)):
            text = fields.string(template, item_path)
            if (
                _mutable_header(fields, name, item_path)
                and text is not None
                and _template(fields, text, item_path)
            ):
                found.append((name.lower(), text))
        return tuple(found)

    removed: list[str] = []
    for item, item_path in fields.items(raw.get("remove"), (*path, "remove")):
        name = fields.string(item, item_path)
        if name is not None and _mutable_header(fields, name, item_path):
            removed.append(name.lower())
    return HeaderRules(templates("set"), templates("append"), tuple(removed))


def _mutable_header(fields: Fields, name: str, path: FieldPath) -> bool:
    lowered = name.lower()
    if not _HEADER_NAME.fullmatch(name):
        fields.problem(path, f"{name!r} is not an HTTP header name")
    elif lowered == "host" or lowered.startswith("x-envoy-"):
        # Envoy ignores changes to these; a policy that asks for one would silently do nothing.
        fields.problem(path, f"{name!r} cannot be changed by a hook (Envoy ignores it)")
    elif lowered.startswith("x-meshtoll-"):
        fields.problem(path, f"{name!r}: x-meshtoll-* headers are set by authz alone")
    else:
        return True
    return False


def _template(fields: Fields, text: str, path: FieldPath) -> bool:
    """A header value template: literal text with {tenant}, {plan}, {consumer}, {route}."""
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:
        fields.problem(path, f"{text!r} is not a valid template ({exc}); write literal braces as {{{{ }}}}")
        return False
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if field not in TEMPLATE_FIELDS or spec or conversion:
            known = ", ".join(f"{{{name}}}" for name in TEMPLATE_FIELDS)
            fields.problem(path, f"unknown placeholder {{{field}}} in {text!r} (known: {known})")
            return False
    return True


def _route_rule(fields: Fields, value: object, path: FieldPath, *, with_methods: bool) -> RouteRule | None:
    extra = (
        ("methods",)
        if with_methods
        else (
            "name",
            "cost",
            "limits",
            "enforced_in",
            "hooks",
            "meter",
            "forward_credentials",
            "allow_double_encoding",
        )
    )
    raw = fields.mapping(value, path, optional=("prefix", "exact", *extra))
    if raw is None:
        return None
    if ("prefix" in raw) == ("exact" in raw):
        fields.problem(path, "exactly one of 'prefix' or 'exact' is required")
        return None
    key = "prefix" if "prefix" in raw else "exact"
    matched = fields.string(raw[key], (*path, key))
    if matched is None:
        return None
    if not matched.startswith("/"):
        fields.problem((*path, key), f"{matched!r} must start with '/'")
        return None
    methods = fields.strings(raw.get("methods"), (*path, "methods"))
    for index, method in enumerate(methods):
        if method not in HTTP_METHODS:
            fields.problem((*path, "methods", index), f"{method!r} is not an HTTP method")
    return RouteRule(matched, key == "exact", frozenset(methods))
