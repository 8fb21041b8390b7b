"""Signing in to the dashboard: an admin token, typed once into a form, exchanged for a session
cookie; and the CSRF token every form that changes something carries.

The cookie is signed, not stored: `<name>.<expiry>.<nonce>.<mac>`, the MAC an HMAC-SHA256
under the dashboard secret of the token's name, the expiry, a random nonce (each sign-in its
own session, and its own CSRF token) and the token's SHA-256. So any worker (and
any instance given the same --dashboard-secret) can check it, and a token removed from the
tokens file, or replaced by another of the same name, ends its sessions at once: the MAC no
longer matches. The token itself is never in a cookie, a URL or a log.

Cookie: HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it, so a
cross-site form post arrives without a session), Path=/, Max-Age of the session, and Secure
when the request came through TLS (a TLS-terminating proxy saying x-forwarded-proto: https;
the admin port itself is plain HTTP).

Without any admin token the admin port answers loopback clients only, as its API does; a
loopback browser is given a session named `loopback` without a form, so that its forms carry
a CSRF token too (a page on another site can post to 127.0.0.1).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from meshtoll.server.admin_access import LOOPBACK_CALLER, AdminAccess, Caller, is_loopback

COOKIE = "meshtoll_session"
SESSION_SECONDS = 8 * 3600


@dataclass(frozen=True, slots=True)
class Session:
    caller: Caller
    cookie: str  # the cookie's value, which the CSRF token is bound to

    @property
    def may_change(self) -> bool:
        return self.caller.scope == "write"


class Sessions:
    def __init__(self, access: AdminAccess, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        self._access = access
        self._secret = secret
        self._clock = clock

    @property
    def needs_login(self) -> bool:
        return self._access.needs_token

    def login(self, presented: str) -> Session | None:
        """A new session for whoever holds this admin token; None for a wrong one."""
        found = self._access.presented(presented) if self.needs_login else None
        if found is None:
            return None
        caller, digest = found
        return Session(caller, self._sign(caller.name, int(self._clock()) + SESSION_SECONDS, digest))

    def loopback(self, peer: str) -> Session | None:
        """Without admin tokens, a loopback browser's session; None otherwise."""
        if self.needs_login or not is_loopback(peer):
            return None
        expiry = int(self._clock()) + SESSION_SECONDS
        return Session(LOOPBACK_CALLER, self._sign(LOOPBACK_CALLER.name, expiry))

    def current(self, headers: dict[str, str], peer: str) -> Session | None:
        """The valid session the request's cookie carries, or None."""
        value = _cookie(headers.get("cookie", ""), COOKIE)
        if value is None:
            return None
        encoded_name, _, rest = value.partition(".")
        expiry_text, _, rest = rest.partition(".")
        nonce, _, _ = rest.partition(".")
        try:
            name = base64.urlsafe_b64decode(encoded_name + "=" * (-len(encoded_name) % 4)).decode()
            expiry = int(expiry_text)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return None
        if expiry <= self._clock():
            return None
        if not self.needs_login:
            if name != LOOPBACK_CALLER.name or not is_loopback(peer):
                return None
            caller, digest = LOOPBACK_CALLER, b""
        else:
            found = self._access.named(name)
            if found is None:
                return None
            caller, digest = found
        if not hmac.compare_digest(value, self._sign(name, expiry, digest, nonce)):
            return None
        return Session(caller, value)

    def csrf_token(self, session: Session) -> str:
        """What the session's forms carry: bound to its cookie, which another site cannot read."""
        return hmac.new(self._secret, b"csrf\n" + session.cookie.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, session: Session, presented: str) -> bool:
        return hmac.compare_digest(self.csrf_token(session), presented)

    def _sign(self, name: str, expiry: int, digest: bytes = b"", nonce: str | None = None) -> str:
        encoded = base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")
        nonce = secrets.token_urlsafe(12) if nonce is None else nonce
        message = f"{encoded}.{expiry}.{nonce}\n".encode() + digest
        mac = hmac.new(self._secret, message, hashlib.sha256).digest()
        return f"{encoded}.{expiry}.{nonce}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


def set_cookie(session: Session | None, secure: bool) -> str:
    """The Set-Cookie value that starts (or, for None, ends) a session."""
    value, age = ("", 0) if session is None else (session.cookie, SESSION_SECONDS)
    flags = "; Secure" if secure else ""
    return f"{COOKIE}={value}; Max-Age={age}; Path=/; HttpOnly; SameSite=Strict{flags}"


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, equals, value = part.strip().partition("=")
        if equals and key == name:
            return value
    return None
