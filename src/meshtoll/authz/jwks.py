"""Fetch the JWK Sets of `jwks_uri` issuers in the background, never on the request path.

Decisions read `JwksCache.key_sets` (a plain dict, replaced entry by entry); a fetch that
fails keeps the last good key set, so an identity provider outage does not lock anyone out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.request
from collections.abc import Callable

import jwt

from meshtoll.policy import CompiledPolicy

log = logging.getLogger("meshtoll.jwks")

FETCH_TIMEOUT_SECONDS = 5.0
# A key set that could not be fetched yet is retried this often, not at the refresh interval.
MISSING_RETRY_SECONDS = 2.0
MAX_JWKS_BYTES = 1 << 20


class JwksCache:
    def __init__(self) -> None:
        self.key_sets: dict[str, jwt.PyJWKSet] = {}
        self._wanted = asyncio.Event()

    def policy_changed(self, policy: CompiledPolicy) -> None:
        """Fetch at once any issuer key set that a new policy version names."""
        if any(uri not in self.key_sets for uri in jwks_uris(policy)):
            self._wanted.set()

    async def refresh_forever(self, current_policy: Callable[[], CompiledPolicy]) -> None:
        while True:
            policy = current_policy()
            uris = jwks_uris(policy)
            await asyncio.gather(*(self._refresh(uri) for uri in uris))
            self._wanted.clear()
            wait: float = policy.policy.auth.jwks_refresh_seconds
            if any(uri not in self.key_sets for uri in uris):
                wait = min(wait, MISSING_RETRY_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wanted.wait(), wait)

    async def _refresh(self, uri: str) -> None:
        try:
            self.key_sets[uri] = await asyncio.to_thread(fetch_jwks, uri)
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            log.warning("fetching JWKS %s failed (keeping the last good keys): %s", uri, exc)


def jwks_uris(policy: CompiledPolicy) -> set[str]:
    return {
        compiled.tenant.jwt.jwks_uri
        for tenants in policy.tenants_by_issuer.values()
        for compiled in tenants
        if compiled.tenant.jwt is not None and compiled.tenant.jwt.jwks_uri is not None
    }


def fetch_jwks(uri: str) -> jwt.PyJWKSet:
    request = urllib.request.Request(uri, headers={"accept": "application/json"})
    with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_SECONDS) as response:
        body = response.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError(f"JWK Set larger than {MAX_JWKS_BYTES} bytes")
    return jwt.PyJWKSet.from_dict(json.loads(body))
