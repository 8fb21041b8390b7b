"""Who may use the admin port's API: a bearer token when any is configured (by name and
scope, from --admin-tokens-file, and MESHTOLL_ADMIN_TOKEN as a write token named `admin`),
otherwise loopback clients only.

The port's default host is 0.0.0.0 (in Kubernetes, Envoy and the kubelet reach meshtoll
from other addresses), so without this anyone who can reach the pod could read every
tenant's usage, invoices and quotas, and change tenants and keys. /healthz, /readyz and
/metrics stay open: probes and scrapers carry no token, and they expose no tenant's data
(only counts and versions). A read token may GET; every other method needs a write token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass

from meshtoll.server.admin_tokens import ENVIRONMENT_TOKEN_NAME, AdminToken
from meshtoll.transport.http_server import response

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
READ_METHODS = frozenset({"GET", "HEAD"})


def _refusal(status: int, reason: str, extra: tuple[tuple[str, str], ...], error: str, message: str) -> bytes:
    body = json.dumps({"error": error, "message": message}).encode()
    return response(status, reason, (("content-type", "application/json"), *extra), body)


# 401 asks for credentials (RFC 6750: the challenge names the scheme; a wrong token adds
# error="invalid_token"); 403 says these credentials (or this address) will not do.
_MISSING_TOKEN = _refusal(
    401,
    "Unauthorized",
    (("www-authenticate", "Bearer"),),
    "unauthorized",
    "the admin API needs an Authorization: Bearer <admin token> header",
)
_WRONG_TOKEN = _refusal(
    401,
    "Unauthorized",
    (("www-authenticate", 'Bearer error="invalid_token"'),),
    "unauthorized",
    "the admin token is not valid",
)
_NOT_LOOPBACK = _refusal(
    403,
    "Forbidden",
    (),
    "forbidden",
    "the admin API answers only loopback clients unless meshtoll serve has admin tokens: "
    "set --admin-tokens-file (or MESHTOLL_ADMIN_TOKEN) and send Authorization: Bearer <token>",
)
_READ_ONLY = _refusal(
    403,
    "Forbidden",
    (("www-authenticate", 'Bearer error="insufficient_scope", scope="write"'),),
    "insufficient_scope",
    "this admin token may read, not change: changes need a token of scope write",
)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling the admin API: a token's name (the audit log's actor) and its scope."""

    name: str
    scope: str


LOOPBACK_CALLER = Caller("loopback", "write")


class AdminAccess:
    def __init__(
        self, token: str | None, tokens: Callable[[], dict[bytes, AdminToken]] | None = None
    ) -> None:
        """`token`: MESHTOLL_ADMIN_TOKEN; `tokens`: the current tokens of the tokens file."""
        self._environment = None if token is None else hashlib.sha256(token.encode("latin-1")).digest()
        self._tokens = tokens

    @property
    def needs_token(self) -> bool:
        return self._environment is not None or self._tokens is not None

    def caller(self, method: str, headers: dict[str, str], peer: str) -> Caller | bytes:
        """Who this request comes from, or the complete refusal to send."""
        if not self.needs_token:
            if not is_loopback(peer):
                return _NOT_LOOPBACK
            return LOOPBACK_CALLER
        scheme, _, presented = headers.get("authorization", "").partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            return _MISSING_TOKEN
        token = self._token(hashlib.sha256(presented.encode("latin-1")).digest())
        if token is None:
            return _WRONG_TOKEN
        if method not in READ_METHODS and token.scope != "write":
            return _READ_ONLY
        return Caller(token.name, token.scope)

    def presented(self, presented: str) -> tuple[Caller, bytes] | None:
        """The token a login form was given, with its digest; None when it is no admin token."""
        digest = hashlib.sha256(presented.strip().encode("utf-8")).digest()
        token = self._token(digest)
        return None if token is None else (Caller(token.name, token.scope), digest)

    def named(self, name: str) -> tuple[Caller, bytes] | None:
        """The current token of that name with its digest (a session names its token: one
        removed or replaced since ends the session)."""
        if self._environment is not None and name == ENVIRONMENT_TOKEN_NAME:
            return Caller(name, "write"), self._environment
        for digest, token in (self._tokens() if self._tokens is not None else {}).items():
            if token.name == name:
                return Caller(token.name, token.scope), digest
        return None

    def _token(self, digest: bytes) -> AdminToken | None:
        # By the SHA-256 of what was presented: how long a comparison (or a dict probe) takes
        # tells nothing about how much of a guessed token was right.
        if self._environment is not None and hmac.compare_digest(digest, self._environment):
            return AdminToken(ENVIRONMENT_TOKEN_NAME, "write")
        return None if self._tokens is None else self._tokens().get(digest)


def is_loopback(peer: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (a dual-stack `::` socket)."""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False  # no peer address (not a TCP socket): nothing proves it is local
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback
