"""The rate-limit service's decision, for Envoy's RLS requests: descriptors in, one status per
descriptor out. Transport-free: the gRPC adapter (rls.py) translates Envoy's protobufs.

Descriptors of the policy's domain (`ratelimit.domain`, "meshtoll" by default) name a tenant
and optionally its route: each stands for one request of that tenant, checked against every
limit the policy gives the tenant on that route, unless the route's limits are enforced in
the authz call (then the descriptor is not counted again here). Descriptors of any other
domain go to `other_domains`: in `meshtoll serve` and `meshtoll ratelimit`, the domains of
envoyproxy/ratelimit configuration files (meshtoll.envoyproxy_ratelimit.domains).
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Protocol

from meshtoll.counting.limits import Check
from meshtoll.policy.limits import PolicyLimits
from meshtoll.policy.reload import PolicyHolder
from meshtoll.ratelimit.decision import Descriptor, RateLimitDecision
from meshtoll.ratelimit.limiter import Limiter
from meshtoll.ratelimit.planned import Planned, decide_planned, with_cost
from meshtoll.wire import CHARGE_KEY, CHARGE_UNITS


class Domains(Protocol):
    def decide(
        self, domain: str, descriptors: Sequence[Descriptor], hits_addend: int
    ) -> Awaitable[RateLimitDecision]:
        """Raises StorageUnavailable under the "closed" failure policy, and
        InvalidRateLimitRequest for a request it will not answer."""
        ...


class RateLimitService:
    def __init__(self, policy: PolicyHolder | None, limiter: Limiter, other_domains: Domains) -> None:
        """`policy` None: the RLS alone (`meshtoll ratelimit`), every domain is another's."""
        self._policy = policy
        self._limiter = limiter
        self._other_domains = other_domains

    def decide(
        self, domain: str, descriptors: Sequence[Descriptor], hits_addend: int
    ) -> Awaitable[RateLimitDecision]:
        """Raises StorageUnavailable only under the "closed" failure policy, and
        InvalidRateLimitRequest where envoyproxy/ratelimit answers with an error.

        Not a coroutine: it hands on the awaitable of the decision it picks, so that no
        frame of its own waits for the Redis reply and is resumed by it."""
        current = None if self._policy is None else self._policy.current  # one version per decision
        if current is None or domain != current.policy.ratelimit.domain:
            return self._other_domains.decide(domain, descriptors, hits_addend)
        hits_addend = hits_addend or 1  # proto3 cannot tell an unset hits_addend from 0: unset means 1
        limits = current.limits
        planned = [_planned(limits, descriptor, descriptor.hits(hits_addend)) for descriptor in descriptors]
        return decide_planned(self._limiter, planned)


def _planned(limits: PolicyLimits, descriptor: Descriptor, hits: int) -> Planned:
    entries = dict(descriptor.entries)
    tenant = entries.get("tenant")
    if tenant is None:
        return Planned()
    route = entries.get("route", "")
    if entries.get(CHARGE_KEY) == CHARGE_UNITS:
        # Sent after the response (apply_on_stream_done) with the units the body hook
        # read as hits_addend: charge them to the unit limits that looked before.
        return Planned(limits.charges(tenant, route, hits, where="service"))
    checks = limits.checks(tenant, route, where="service")
    if descriptor.override is not None:
        # Envoy's per-descriptor limit replaces the policy's for this descriptor.
        return Planned(
            tuple(Check(f"{check.key}_override", descriptor.override, hits) for check in checks[:1])
        )
    return Planned(with_cost(checks, hits))
