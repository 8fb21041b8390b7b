"""Descriptors planned as counter checks, decided together in one limiter call: how the
rate-limit service counts meshtoll's way (all or nothing, calendar months), for the policy's
domain and for configured domains in the `meshtoll` compatibility."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshtoll.counting.limits import Check, CheckResult
from meshtoll.ratelimit.decision import DescriptorStatus, RateLimitDecision
from meshtoll.ratelimit.limiter import Limiter
from meshtoll.ratelimit.verdict import most_restrictive

NO_LIMIT = DescriptorStatus(False, None, 0, 0.0)


@dataclass(frozen=True, slots=True)
class Planned:
    """One descriptor's counter checks, and its status when it has none to count."""

    checks: tuple[Check, ...] = ()
    without_checks: DescriptorStatus = NO_LIMIT


async def decide_planned(limiter: Limiter, planned: Sequence[Planned]) -> RateLimitDecision:
    """Every descriptor's checks in one limiter call: all admitted or none consumed. Raises
    StorageUnavailable only under the "closed" failure policy."""
    checks = [check for each in planned for check in each.checks]
    results = await limiter.results(checks) if checks else []
    if results is None:  # the store is down and the failure policy is open
        return RateLimitDecision(False, tuple(each.without_checks for each in planned))
    statuses = []
    position = 0
    for each in planned:
        statuses.append(_status(limiter, each, results[position : position + len(each.checks)]))
        position += len(each.checks)
    return RateLimitDecision(any(status.over_limit for status in statuses), tuple(statuses))


def _status(limiter: Limiter, planned: Planned, results: Sequence[CheckResult]) -> DescriptorStatus:
    if not planned.checks:
        return planned.without_checks
    refused, check, result = most_restrictive(planned.checks, results, enforce=not limiter.shadow)
    if refused:
        return DescriptorStatus(True, check.limit, 0, result.retry_after)
    return DescriptorStatus(False, check.limit, result.remaining, result.reset_seconds)


def with_cost(checks: tuple[Check, ...], hits: int) -> tuple[Check, ...]:
    """`hits` requests at once: each check's cost (1 for a request limit, the route's units
    for a unit limit, 0 for a look) times the hits; 0 hits only look."""
    if hits == 1:
        return checks
    return tuple(Check(check.key, check.limit, check.cost * hits) for check in checks)
