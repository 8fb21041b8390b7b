"""The authz decision: request attributes and the compiled policy in, Allow or Deny out.

Pure: no I/O, no clock of its own (`now` is passed in), no transport types.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Mapping
from urllib.parse import parse_qs

import jwt

from meshtoll.api_keys import checksum_fails
from meshtoll.authz.request_path import DOUBLE_ENCODED, BadPath, double_encoded, normalize_request_path
from meshtoll.authz.tokens import looks_like_jwt, verify_token
from meshtoll.authz.verdict import Allow, CheckRequest, Deny, Verdict
from meshtoll.errors import TokenRejected
from meshtoll.policy import CompiledPolicy, CompiledTenant
from meshtoll.wire import (
    CONSUMER_HEADER,
    CONSUMER_KEY,
    EXTPROC_HEADER,
    HEADER_PREFIX,
    IDENTITY_HEADERS,
    PLAN_HEADER,
    PLAN_KEY,
    ROUTE_HEADER,
    ROUTE_KEY,
    TENANT_HEADER,
    TENANT_KEY,
)

_REALM = 'Bearer realm="meshtoll"'
MISSING_CREDENTIALS = Deny(
    401,
    "missing_credentials",
    "no API key, bearer token or client certificate was presented",
    (("www-authenticate", _REALM),),
)
INVALID_API_KEY = Deny(401, "invalid_api_key", "the API key is not valid", (("www-authenticate", _REALM),))
REVOKED_API_KEY = Deny(
    401, "revoked_api_key", "the API key has been revoked", (("www-authenticate", _REALM),)
)
EXPIRED_API_KEY = Deny(401, "expired_api_key", "the API key has expired", (("www-authenticate", _REALM),))
UNKNOWN_CERTIFICATE = Deny(
    401,
    "unknown_client_certificate",
    "the client certificate's identity belongs to no tenant",
    (("www-authenticate", _REALM),),
)
TENANT_SUSPENDED = Deny(403, "tenant_suspended", "the tenant is suspended")
IP_NOT_ALLOWED = Deny(403, "ip_not_allowed", "the client address is not allowed for this tenant")
ROUTE_NOT_ALLOWED = Deny(403, "route_not_allowed", "the tenant may not call this route")
METHOD_NOT_ALLOWED = Deny(403, "method_not_allowed", "the tenant may not use this method on this route")
DOUBLE_ENCODED_PATH = Deny(400, "bad_path", DOUBLE_ENCODED.message)
# The x-meshtoll-* headers an allow sets, by (a route matched, the route has hooks): a
# client's value of any other is named for removal.
_SET_HEADERS = {
    (with_route, with_hooks): frozenset(
        name
        for name in IDENTITY_HEADERS
        if (with_route or name != ROUTE_HEADER) and (with_hooks or name != EXTPROC_HEADER)
    )
    for with_route in (False, True)
    for with_hooks in (False, True)
}
_new_tuple = tuple.__new__


class Identity:
    __slots__ = ("consumer", "key_header", "key_param", "tenant")

    def __init__(
        self,
        tenant: CompiledTenant,
        consumer: str,
        key_header: str | None = None,
        key_param: str | None = None,
    ) -> None:
        self.tenant = tenant
        self.consumer = consumer
        # Where the API key came from (a header, or a query parameter): what Envoy is asked
        # to remove before the request goes upstream. None for tokens and certificates.
        self.key_header = key_header
        self.key_param = key_param


def decide(
    request: CheckRequest,
    policy: CompiledPolicy,
    remote_jwks: Mapping[str, jwt.PyJWKSet],
    now: float,
) -> Verdict:
    # First: a path that cannot be matched safely is refused whoever sends it (400, not 401:
    # no credential would make it acceptable).
    path = normalize_request_path(request.path)
    if isinstance(path, BadPath):
        return Deny(400, "bad_path", path.message)
    if "%25" in path and double_encoded(path) and not _allows_double_encoding(policy, path):
        return DOUBLE_ENCODED_PATH
    identity = identify(request, policy, remote_jwks, now)
    if isinstance(identity, Deny):
        return identity
    return authorize(request, policy, identity, path)


def _allows_double_encoding(policy: CompiledPolicy, path: str) -> bool:
    """Whether the route the path matches (the most specific, as for its name) opts out."""
    routes = policy.routes.match(path)
    return bool(routes) and routes[0].allow_double_encoding


def identify(
    request: CheckRequest,
    policy: CompiledPolicy,
    remote_jwks: Mapping[str, jwt.PyJWKSet],
    now: float,
) -> Identity | Deny:
    """Who is calling. Explicit credentials win over the transport's client certificate."""
    settings = policy.policy.auth
    headers = request.headers
    api_key = headers.get(settings.api_key_header)
    if api_key is not None:
        return _api_key_identity(api_key, policy, now, settings.api_key_header, None)
    authorization = headers.get("authorization")
    if authorization is not None and authorization[:7].lower() == "bearer ":
        bearer = authorization[7:].strip()
        if looks_like_jwt(bearer):
            return _token_identity(bearer, policy, remote_jwks, now)
        return _api_key_identity(bearer, policy, now, "authorization", None)
    if settings.api_key_query_param is not None and "?" in request.path:
        values = parse_qs(request.path.partition("?")[2]).get(settings.api_key_query_param)
        if values:
            return _api_key_identity(values[0], policy, now, None, settings.api_key_query_param)
    for uri in request.peer_uri_sans:
        tenant = policy.tenants_by_spiffe_id.get(uri)
        if tenant is not None:
            return Identity(tenant, uri)
    return UNKNOWN_CERTIFICATE if request.peer_uri_sans else MISSING_CREDENTIALS


def _api_key_identity(
    api_key: str, policy: CompiledPolicy, now: float, header: str | None, param: str | None
) -> Identity | Deny:
    prefix = policy.key_prefix
    if api_key.startswith(prefix) and checksum_fails(api_key, prefix[:-1]):
        return INVALID_API_KEY  # one of meshtoll's keys, mistyped: no lookup needed
    digest = hashlib.sha256(api_key.encode()).digest()
    entry = policy.keys_by_sha256.get(digest)
    # The dict probe compares SHA-256 digests, which reveal nothing about the key; the final
    # comparison is constant-time anyway, so no code path compares key material otherwise.
    if entry is None or not hmac.compare_digest(entry.key.sha256, digest):
        return INVALID_API_KEY
    key = entry.key
    if key.revoked:
        return REVOKED_API_KEY
    if key.expires_at is not None and now >= key.expires_at:
        return EXPIRED_API_KEY
    return Identity(entry.tenant, key.id, header, param)


def _token_identity(
    token: str, policy: CompiledPolicy, remote_jwks: Mapping[str, jwt.PyJWKSet], now: float
) -> Identity | Deny:
    try:
        found = verify_token(token, policy, remote_jwks, now)
    except TokenRejected as rejected:
        if rejected.unavailable:
            # 503, not 401: the token may be fine, meshtoll just cannot check it yet.
            return Deny(503, rejected.code, rejected.message)
        challenge = f'{_REALM}, error="invalid_token", error_description="{rejected.message}"'
        return Deny(401, rejected.code, rejected.message, (("www-authenticate", challenge),))
    return Identity(found.tenant, found.consumer)


def authorize(request: CheckRequest, policy: CompiledPolicy, identity: Identity, path: str) -> Verdict:
    """May this identity make this request; `path` is the request's, as normalize_request_path
    reads it: every route rule is matched against that, never against the raw target."""
    compiled = identity.tenant
    tenant = compiled.tenant
    if tenant.status != "active":
        return TENANT_SUSPENDED
    if tenant.access.ip and not _address_allowed(request, policy, compiled):
        return IP_NOT_ALLOWED
    if compiled.routes is not None:
        method_sets = compiled.routes.match(path)
        if not method_sets:
            return ROUTE_NOT_ALLOWED
        if not any(not methods or request.method in methods for methods in method_sets):
            return METHOD_NOT_ALLOWED
    routes = policy.routes.match(path)
    route = routes[0].name if routes else ""
    hooks = routes[0].hooks if routes else None
    headers: tuple[tuple[str, str], ...] = (
        (TENANT_HEADER, tenant.name),
        (PLAN_HEADER, tenant.plan),
        (CONSUMER_HEADER, identity.consumer),
    )
    if route:
        headers += ((ROUTE_HEADER, route),)
    if hooks is not None:
        headers += ((EXTPROC_HEADER, "open" if hooks.failure_mode_allow else "closed"),)
    # The API key stops here unless the plan or the route forwards it (hide credentials).
    hidden = identity.key_header
    removed_params: tuple[str, ...] = ()
    if compiled.forwards_credentials or (routes and routes[0].forward_credentials):
        hidden = None
    elif identity.key_param is not None:
        removed_params = (identity.key_param,)
    # Headers meshtoll sets replace the client's value; any other x-meshtoll-* the client
    # sent is removed, so upstreams can trust every x-meshtoll-* header they see.
    kept = _SET_HEADERS[bool(route), hooks is not None]
    removed = tuple(
        [
            name
            for name in request.headers
            if name == hidden or (name.startswith(HEADER_PREFIX) and name not in kept)
        ]
    )
    metadata = {
        TENANT_KEY: tenant.name,
        PLAN_KEY: tenant.plan,
        CONSUMER_KEY: identity.consumer,
        ROUTE_KEY: route,
    }
    # Built by tuple.__new__: the named tuple's constructor is a Python function around it.
    return _new_tuple(
        Allow,
        (
            tenant.name,
            tenant.plan,
            identity.consumer,
            route,
            headers,
            removed,
            metadata,
            None,
            removed_params,
        ),
    )


def client_address(request: CheckRequest, trusted_proxy_hops: int) -> str:
    """The client's address: the peer, or with N trusted proxies the Nth X-Forwarded-For hop
    from the right (the peer is appended when the proxy in front did not add it itself)."""
    if trusted_proxy_hops == 0:
        return request.source_address
    forwarded = request.headers.get("x-forwarded-for", "")
    chain = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    if not chain or chain[-1] != request.source_address:
        chain.append(request.source_address)
    return chain[max(0, len(chain) - 1 - trusted_proxy_hops)]


def _address_allowed(request: CheckRequest, policy: CompiledPolicy, tenant: CompiledTenant) -> bool:
    text = client_address(request, policy.policy.auth.trusted_proxy_hops)
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return any(address in network for network in tenant.tenant.access.ip)
