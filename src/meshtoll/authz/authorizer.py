"""The authz service shared by both transports: the live policy, the JWKS cache, a clock and,
for routes whose limits are enforced in the authz call itself (the fused path), the limiter.

`check` answers synchronously when no counter is involved, and with an awaitable when the
limiter has to ask the store: the common no-limit path never pays for a coroutine.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from meshtoll.authz.decide import decide
from meshtoll.authz.jwks import JwksCache
from meshtoll.authz.verdict import Allow, CheckRequest, Deny, Verdict
from meshtoll.errors import StorageUnavailable
from meshtoll.policy.reload import PolicyHolder
from meshtoll.ratelimit.limits import Check
from meshtoll.ratelimit.policy_limits import PolicyLimits
from meshtoll.telemetry.metrics import DecisionCounts

if TYPE_CHECKING:
    from meshtoll.ratelimit.limiter import Limiter

LIMITS_UNAVAILABLE = Deny(
    503, "ratelimit_unavailable", "limits cannot be checked right now and the failure policy is closed"
)


class Authorizer:
    """One per transport, so that decisions are counted by the transport that asked."""

    def __init__(
        self,
        policy: PolicyHolder,
        jwks: JwksCache,
        *,
        transport: str = "direct",
        counts: DecisionCounts | None = None,
        limiter: Limiter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._policy = policy
        self._jwks = jwks
        self._transport = transport
        self._counts = (counts or DecisionCounts()).counts
        self._limiter = limiter
        self._clock = clock
        self._limits = PolicyLimits(policy.current)

    def check(self, request: CheckRequest) -> Verdict | Awaitable[Verdict]:
        policy = self._policy.current
        verdict = decide(request, policy, self._jwks.key_sets, self._clock())
        if isinstance(verdict, Allow) and self._limiter is not None:
            if self._limits.policy is not policy:
                self._limits = PolicyLimits(policy)
            checks = self._limits.checks(verdict.tenant, verdict.route, where="authz")
            if checks:
                return self._limited(verdict, checks, self._limiter)
        return self._counted(verdict)

    async def _limited(self, allow: Allow, checks: Sequence[Check], limiter: Limiter) -> Verdict:
        try:
            limits = await limiter.check(checks)
        except StorageUnavailable:
            return self._counted(LIMITS_UNAVAILABLE)
        if limits.admitted:
            if limits.headers and self._policy.current.policy.ratelimit.headers:
                return self._counted(dataclasses.replace(allow, response_headers=limits.headers))
            return self._counted(allow)
        assert limits.deciding is not None
        name = limits.deciding[0].limit.name
        message = (
            f"the quota {name!r} is used up"
            if limits.code == "quota_exceeded"
            else f"the rate limit {name!r} is exceeded"
        )
        return self._counted(Deny(429, limits.code, message, limits.headers))

    def _counted(self, verdict: Verdict) -> Verdict:
        outcome = verdict.code if isinstance(verdict, Deny) else "allow"
        self._counts[(self._transport, outcome)] += 1
        return verdict
