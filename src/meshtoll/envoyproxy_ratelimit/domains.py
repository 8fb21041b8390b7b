"""The domains of envoyproxy/ratelimit configuration files, answered with the compatibility
chosen for each: `strict` answers and counts exactly as envoyproxy/ratelimit does
(strict.py), `meshtoll` counts meshtoll's way (all or nothing, calendar months). One
compatibility is chosen for all those domains, and may be chosen otherwise for some."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence

from meshtoll.counting.limits import Check
from meshtoll.counting.store import Compat
from meshtoll.envoyproxy_ratelimit.config_files import (
    UNLIMITED_REMAINING,
    DescriptorConfigs,
    counter_key,
    resolve_replaces,
)
from meshtoll.envoyproxy_ratelimit.strict import StrictLimiter
from meshtoll.ratelimit.decision import Descriptor, DescriptorStatus, RateLimitDecision
from meshtoll.ratelimit.planned import Planned, decide_planned

# What envoyproxy/ratelimit answers for a descriptor configured `unlimited`: nothing counted.
_UNLIMITED = Planned(without_checks=DescriptorStatus(False, None, UNLIMITED_REMAINING, 0.0))


class ConfiguredDomains:
    def __init__(
        self,
        configs: Callable[[], DescriptorConfigs | None],
        strict: StrictLimiter,
        *,
        compat: Compat = "strict",
        compat_domains: Mapping[str, Compat] | None = None,
    ) -> None:
        """`configs`: the active configuration (None: no directory given; every domain is
        then unknown). `compat_domains`: the domains whose compatibility is not `compat`."""
        self._configs = configs
        self._strict = strict
        self._compat = compat
        self._compat_domains = dict(compat_domains or {})

    def decide(
        self, domain: str, descriptors: Sequence[Descriptor], hits_addend: int
    ) -> Awaitable[RateLimitDecision]:
        """Raises StorageUnavailable only under the "closed" failure policy, and
        InvalidRateLimitRequest where envoyproxy/ratelimit answers with an error (strict).
        Not a coroutine, as RateLimitService.decide."""
        if self._compat_domains.get(domain, self._compat) == "strict":
            return self._strict.decide(self._configs(), domain, descriptors, hits_addend)
        hits_addend = hits_addend or 1  # proto3 cannot tell an unset hits_addend from 0: unset means 1
        # The strict limiter's own: one limiter (one failure policy, one shadow mode) for both.
        return decide_planned(self._strict.limiter, self._plan(domain, descriptors, hits_addend))

    def _plan(self, domain: str, descriptors: Sequence[Descriptor], hits_addend: int) -> list[Planned]:
        configs = self._configs()
        matches = [None if configs is None else configs.match(domain, d.entries) for d in descriptors]
        planned: list[Planned] = []
        for descriptor, match in zip(descriptors, resolve_replaces(matches), strict=True):
            cost = descriptor.hits(hits_addend)
            if descriptor.override is not None:
                # Envoy's own limit for this descriptor wins over any configured one.
                override = Check(counter_key(domain, descriptor.entries), descriptor.override, cost)
                planned.append(Planned((override,)))
            elif match is None:
                planned.append(Planned())
            elif match.limit is None:
                planned.append(_UNLIMITED)
            else:
                planned.append(Planned((Check(match.key, match.limit, cost),)))
        return planned
