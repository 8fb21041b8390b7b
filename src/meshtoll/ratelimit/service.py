"""The rate-limit service's decision, for Envoy's RLS requests: descriptors in, one status per
descriptor out. Transport-free: the gRPC adapter (rls.py) translates Envoy's protobufs.

Descriptors of the policy's domain (`ratelimit.domain`, "meshtoll" by default) name a tenant
and optionally its route: each stands for one request of that tenant, checked against every
limit the policy gives the tenant on that route, unless the route's limits are enforced in
the authz call (then the descriptor is not counted again here). Descriptors of any other
domain are matched against envoyproxy/ratelimit configuration files and answered, by
default, exactly as envoyproxy/ratelimit answers (strict.py); with the `meshtoll`
compatibility they are counted meshtoll's way (all or nothing, calendar months). The
compatibility is chosen for all those domains, and may be chosen otherwise for some.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from meshtoll.counting.limits import Check, CheckResult
from meshtoll.policy.limits import PolicyLimits
from meshtoll.policy.reload import PolicyHolder
from meshtoll.ratelimit.decision import Descriptor, DescriptorStatus, RateLimitDecision
from meshtoll.ratelimit.descriptor_config import (
    UNLIMITED_REMAINING,
    DescriptorConfigs,
    counter_key,
    resolve_replaces,
)
from meshtoll.ratelimit.limiter import Limiter
from meshtoll.ratelimit.strict import StrictLimiter
from meshtoll.ratelimit.verdict import most_restrictive
from meshtoll.wire import CHARGE_KEY, CHARGE_UNITS

Compat = Literal["strict", "meshtoll"]
COMPAT_MODES: tuple[Compat, ...] = ("strict", "meshtoll")


NO_LIMIT = DescriptorStatus(False, None, 0, 0.0)
UNLIMITED = DescriptorStatus(False, None, UNLIMITED_REMAINING, 0.0)


@dataclass(frozen=True, slots=True)
class _Planned:
    """One descriptor's counter checks; `unlimited` when configured so (nothing counted)."""

    checks: tuple[Check, ...] = ()
    unlimited: bool = False

    @property
    def empty_status(self) -> DescriptorStatus:
        return UNLIMITED if self.unlimited else NO_LIMIT


class RateLimitService:
    def __init__(
        self,
        policy: PolicyHolder | None,
        limiter: Limiter,
        descriptor_configs: Callable[[], DescriptorConfigs | None] = lambda: None,
        *,
        compat: Compat = "strict",
        strict: StrictLimiter | None = None,
        compat_domains: Mapping[str, Compat] | None = None,
    ) -> None:
        """`policy` None: the RLS alone (`meshtoll ratelimit`), configuration files only.
        `compat_domains`: the domains whose compatibility is not `compat`."""
        self._policy = policy
        self._limiter = limiter
        self._descriptor_configs = descriptor_configs
        self._compat = compat
        self._compat_domains = dict(compat_domains or {})
        self._strict = strict or StrictLimiter(limiter)

    async def decide(
        self, domain: str, descriptors: Sequence[Descriptor], hits_addend: int
    ) -> RateLimitDecision:
        """Raises StorageUnavailable only under the "closed" failure policy, and
        InvalidRateLimitRequest where envoyproxy/ratelimit answers with an error."""
        if self._compat_domains.get(domain, self._compat) == "strict" and not self._is_policy_domain(domain):
            return await self._strict.decide(self._descriptor_configs(), domain, descriptors, hits_addend)
        hits_addend = hits_addend or 1  # proto3 cannot tell an unset hits_addend from 0: unset means 1
        planned = self._plan(domain, descriptors, hits_addend)
        checks = [check for each in planned for check in each.checks]
        results = await self._limiter.results(checks) if checks else []
        if results is None:  # the store is down and the failure policy is open
            return RateLimitDecision(False, tuple(each.empty_status for each in planned))
        statuses = []
        position = 0
        for each in planned:
            statuses.append(self._status(each, results[position : position + len(each.checks)]))
            position += len(each.checks)
        return RateLimitDecision(any(status.over_limit for status in statuses), tuple(statuses))

    def _is_policy_domain(self, domain: str) -> bool:
        return self._policy is not None and domain == self._policy.current.policy.ratelimit.domain

    def _plan(self, domain: str, descriptors: Sequence[Descriptor], hits_addend: int) -> list[_Planned]:
        if self._policy is not None and self._is_policy_domain(domain):
            limits = self._policy.current.limits
            return [
                self._policy_planned(limits, descriptor, descriptor.hits(hits_addend))
                for descriptor in descriptors
            ]
        configs = self._descriptor_configs()
        matches = [None if configs is None else configs.match(domain, d.entries) for d in descriptors]
        planned: list[_Planned] = []
        for descriptor, match in zip(descriptors, resolve_replaces(matches), strict=True):
            cost = descriptor.hits(hits_addend)
            if descriptor.override is not None:
                # Envoy's own limit for this descriptor wins over any configured one.
                override = Check(counter_key(domain, descriptor.entries), descriptor.override, cost)
                planned.append(_Planned((override,)))
            elif match is None:
                planned.append(_Planned())
            elif match.limit is None:
                planned.append(_Planned(unlimited=True))
            else:
                planned.append(_Planned((Check(match.key, match.limit, cost),)))
        return planned

    def _policy_planned(self, limits: PolicyLimits, descriptor: Descriptor, hits: int) -> _Planned:
        entries = dict(descriptor.entries)
        tenant = entries.get("tenant")
        if tenant is None:
            return _Planned()
        route = entries.get("route", "")
        if entries.get(CHARGE_KEY) == CHARGE_UNITS:
            # Sent after the response (apply_on_stream_done) with the units the body hook
            # read as hits_addend: charge them to the unit limits that looked before.
            return _Planned(limits.charges(tenant, route, hits, where="service"))
        checks = limits.checks(tenant, route, where="service")
        if descriptor.override is not None:
            # Envoy's per-descriptor limit replaces the policy's for this descriptor.
            return _Planned(
                tuple(Check(f"{check.key}_override", descriptor.override, hits) for check in checks[:1])
            )
        return _Planned(_with_cost(checks, hits))

    def _status(self, planned: _Planned, results: Sequence[CheckResult]) -> DescriptorStatus:
        if not planned.checks:
            return planned.empty_status
        refused, check, result = most_restrictive(planned.checks, results, enforce=not self._limiter.shadow)
        if refused:
            return DescriptorStatus(True, check.limit, 0, result.retry_after)
        return DescriptorStatus(False, check.limit, result.remaining, result.reset_seconds)


def _with_cost(checks: tuple[Check, ...], hits: int) -> tuple[Check, ...]:
    """`hits` requests at once: each check's cost (1 for a request limit, the route's units
    for a unit limit, 0 for a look) times the hits; 0 hits only look."""
    if hits == 1:
        return checks
    return tuple(Check(check.key, check.limit, check.cost * hits) for check in checks)
