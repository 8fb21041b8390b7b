"""JWT verification against the policy's issuers, with the clock passed in.

Signature, algorithm and audience checks are PyJWT's; time claims are checked here
against the injected `now`, so tests of expiry never sleep and never depend on the wall
clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import jwt

from meshtoll.errors import TokenRejected
from meshtoll.policy import CompiledPolicy, CompiledTenant


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    tenant: CompiledTenant
    consumer: str


def looks_like_jwt(value: str) -> bool:
    # A compact JWS is three base64url parts and its header always starts with '{"', which
    # encodes to "eyJ"; an opaque API key sent as a bearer token does not look like that.
    return value.startswith("eyJ") and value.count(".") == 2


def verify_token(
    token: str,
    policy: CompiledPolicy,
    remote_jwks: Mapping[str, jwt.PyJWKSet],
    now: float,
) -> TokenIdentity:
    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise TokenRejected("invalid_token", "the bearer token is not a well-formed JWT") from None
    issuer = unverified.get("iss")
    candidates = policy.tenants_by_issuer.get(issuer) if isinstance(issuer, str) else None
    if not candidates:
        raise TokenRejected("invalid_issuer", "the token's issuer is not trusted")
    tenant = _tenant_for_claims(candidates, unverified)
    settings = tenant.tenant.jwt
    assert settings is not None
    algorithm = header.get("alg")
    if algorithm not in settings.algorithms:
        raise TokenRejected("invalid_token", f"algorithm {algorithm!r} is not accepted")
    key_set = (
        policy.inline_jwks.get(tenant.name)
        if settings.jwks is not None
        else remote_jwks.get(settings.jwks_uri or "")
    )
    if key_set is None:
        raise TokenRejected("jwks_unavailable", "the issuer's keys are not available yet", True)
    key = _signing_key(key_set, header.get("kid"))
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=list(settings.algorithms),
            audience=list(settings.audiences) or None,
            issuer=settings.issuer,
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )
    except jwt.InvalidAudienceError:
        raise TokenRejected("invalid_audience", "the token is not meant for this audience") from None
    except jwt.MissingRequiredClaimError as exc:
        raise TokenRejected("invalid_token", f"the token has no '{exc.claim}' claim") from None
    except jwt.PyJWTError:
        raise TokenRejected("invalid_token", "the token's signature does not verify") from None
    _check_times(claims, now, policy.policy.auth.jwt_leeway_seconds)
    consumer = claims.get(settings.consumer_claim)
    if not isinstance(consumer, str) or not consumer:
        raise TokenRejected("invalid_token", f"the token has no '{settings.consumer_claim}' claim")
    return TokenIdentity(tenant, consumer)


def _tenant_for_claims(candidates: list[CompiledTenant], claims: dict[str, object]) -> CompiledTenant:
    if len(candidates) == 1:
        return candidates[0]
    for candidate in candidates:
        assert candidate.tenant.jwt is not None
        if all(claims.get(name) == value for name, value in candidate.tenant.jwt.match_claims):
            return candidate
    raise TokenRejected("invalid_token", "the token matches no tenant of its issuer")


def _signing_key(key_set: jwt.PyJWKSet, kid: object) -> jwt.PyJWK:
    if kid is None and len(key_set.keys) == 1:
        return key_set.keys[0]
    for key in key_set.keys:
        if key.key_id == kid:
            return key
    raise TokenRejected("invalid_token", "the token was signed with an unknown key")


def _check_times(claims: dict[str, object], now: float, leeway: int) -> None:
    expires = claims.get("exp")
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        raise TokenRejected("invalid_token", "the token has no numeric 'exp' claim")
    if now > expires + leeway:
        raise TokenRejected("token_expired", "the token has expired")
    not_before = claims.get("nbf")
    if not_before is not None:
        if not isinstance(not_before, int | float) or isinstance(not_before, bool):
            raise TokenRejected("invalid_token", "the token's 'nbf' claim is not a number")
        if now + leeway < not_before:
            raise TokenRejected("token_not_yet_valid", "the token is not valid yet")
