"""The authz service shared by both transports: the live policy, the JWKS cache and a clock."""

from __future__ import annotations

import time
from collections.abc import Callable

from meshtoll.authz.decide import decide
from meshtoll.authz.jwks import JwksCache
from meshtoll.authz.verdict import CheckRequest, Deny, Verdict
from meshtoll.policy.reload import PolicyHolder
from meshtoll.telemetry.metrics import DecisionCounts


class Authorizer:
    """One per transport, so that decisions are counted by the transport that asked."""

    def __init__(
        self,
        policy: PolicyHolder,
        jwks: JwksCache,
        *,
        transport: str = "direct",
        counts: DecisionCounts | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._policy = policy
        self._jwks = jwks
        self._transport = transport
        self._counts = (counts or DecisionCounts()).counts
        self._clock = clock

    def check(self, request: CheckRequest) -> Verdict:
        verdict = decide(request, self._policy.current, self._jwks.key_sets, self._clock())
        outcome = verdict.code if isinstance(verdict, Deny) else "allow"
        self._counts[(self._transport, outcome)] += 1
        return verdict
