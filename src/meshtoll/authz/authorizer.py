"""The authz service shared by both transports: the live policy, the JWKS cache and a clock."""

from __future__ import annotations

import time
from collections.abc import Callable

from meshtoll.authz.decide import decide
from meshtoll.authz.jwks import JwksCache
from meshtoll.authz.verdict import CheckRequest, Verdict
from meshtoll.policy.reload import PolicyHolder


class Authorizer:
    def __init__(self, policy: PolicyHolder, jwks: JwksCache, clock: Callable[[], float] = time.time) -> None:
        self._policy = policy
        self._jwks = jwks
        self._clock = clock

    def check(self, request: CheckRequest) -> Verdict:
        return decide(request, self._policy.current, self._jwks.key_sets, self._clock())
