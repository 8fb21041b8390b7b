"""Who may read the admin port's data: a bearer token when one is configured, otherwise
loopback clients only.

The port's default host is 0.0.0.0 (in Kubernetes, Envoy and the kubelet reach meshtoll
from other addresses), so without this anyone who can reach the pod could read every
tenant's usage, invoices and quotas. /healthz, /readyz and /metrics stay open: probes and
scrapers carry no token, and they expose no tenant's data (only counts and the policy
version).
"""

from __future__ import annotations

import hmac
import ipaddress
import json

from meshtoll.transport.http_server import response

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def _refusal(status: int, reason: str, extra: tuple[tuple[str, str], ...], error: str, message: str) -> bytes:
    body = json.dumps({"error": error, "message": message}).encode()
    return response(status, reason, (("content-type", "application/json"), *extra), body)


# 401 asks for credentials (RFC 6750: the challenge names the scheme; a wrong token adds
# error="invalid_token"); 403 says no credentials would help from this address.
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
    "the admin API answers only loopback clients unless meshtoll serve has an admin token: "
    "set --admin-token or MESHTOLL_ADMIN_TOKEN and send Authorization: Bearer <token>",
)


class AdminAccess:
    def __init__(self, token: str | None) -> None:
        self._token = None if token is None else token.encode("latin-1")

    @property
    def needs_token(self) -> bool:
        return self._token is not None

    def refusal(self, headers: dict[str, str], peer: str) -> bytes | None:
        """None when this request may read admin data, else the complete refusal to send."""
        if self._token is None:
            return None if is_loopback(peer) else _NOT_LOOPBACK
        scheme, _, presented = headers.get("authorization", "").partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            return _MISSING_TOKEN
        # Constant time: the time a comparison takes must not tell how much of a guess was right.
        if not hmac.compare_digest(presented.encode("latin-1"), self._token):
            return _WRONG_TOKEN
        return None


def is_loopback(peer: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (a dual-stack `::` socket)."""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False  # no peer address (not a TCP socket): nothing proves it is local
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback
