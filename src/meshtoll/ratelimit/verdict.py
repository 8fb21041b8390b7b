"""What a set of counter results means for the request: admitted or not, with which error
code and which RateLimit headers. Pure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from meshtoll.counting.limits import Check, CheckResult, RateLimit
from meshtoll.counting.periods import QUOTA_PERIODS
from meshtoll.policy.model import RateLimitHeaders

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class LimitVerdict:
    admitted: bool
    code: str  # "" when admitted; "rate_limited" or "quota_exceeded" when not
    headers: Headers  # RateLimit-* (and Retry-After when refused) for the client
    deciding: tuple[Check, CheckResult] | None  # the most restrictive limit, if any


ADMITTED_WITHOUT_LIMITS = LimitVerdict(True, "", (), None)


def limit_verdict(
    checks: Sequence[Check], results: Sequence[CheckResult], *, enforce: bool = True
) -> LimitVerdict:
    """`enforce=False` is global shadow mode: everything is evaluated, nothing refused."""
    if not checks:
        return ADMITTED_WITHOUT_LIMITS
    refused, check, result = most_restrictive(checks, results, enforce=enforce)
    if refused:
        code = "quota_exceeded" if check.limit.period in QUOTA_PERIODS else "rate_limited"
        return LimitVerdict(False, code, rate_limit_headers(check, result, refused=True), (check, result))
    return LimitVerdict(True, "", rate_limit_headers(check, result, refused=False), (check, result))


def most_restrictive(
    checks: Sequence[Check], results: Sequence[CheckResult], *, enforce: bool = True
) -> tuple[bool, Check, CheckResult]:
    """The limit that speaks for a decision (at least one check): whether it refuses, and
    which. Refused: the refusing limit that admits again last, since the client may retry
    only then. Admitted: the enforced limit with the fewest requests left (the sooner reset
    on a tie), or a shadow one when all are shadow. What authz's RateLimit headers and each
    RLS descriptor status report."""
    pairs = list(zip(checks, results, strict=True))
    enforced = [(check, result) for check, result in pairs if not check.limit.shadow]
    refusing = [(check, result) for check, result in enforced if not result.allowed]
    if refusing and enforce:
        check, result = max(refusing, key=lambda pair: pair[1].retry_after)
        return True, check, result
    check, result = min(enforced or pairs, key=lambda pair: (pair[1].remaining, -pair[1].reset_seconds))
    return False, check, result


def rate_limit_headers(check: Check, result: CheckResult, *, refused: bool) -> Headers:
    """The draft IETF RateLimit header fields (draft 03, as Envoy's ratelimit filter sends
    them), for the most restrictive limit; Retry-After too when the request is refused."""
    if not refused:
        return admitted_headers(check.limit, result.remaining, result.reset_seconds)
    reset = math.ceil(result.retry_after)
    return (
        ("ratelimit-limit", str(check.limit.capacity)),
        ("ratelimit-remaining", str(result.remaining)),
        ("ratelimit-reset", str(reset)),
        ("retry-after", str(max(1, reset))),
    )


# What the RateLimit headers of an admitted request say: its most restrictive limit's
# capacity, what is left, whole seconds to its reset. Numbers in a plain tuple (a named
# tuple's constructor is a Python call, about 2 µs a decision on the loaded machine): the
# HTTP transport writes them as bytes in one formatting step (`RATE_LIMIT_LINES % state`),
# the gRPC one as header pairs (`rate_limit_pairs`).
RateLimitState = tuple[int, int, int]
# The header lines of an HTTP/1.1 head, as `rate_limit_pairs` would be written: a format, so
# that a transport can append the rest of its head to it once and format both in one step.
RATE_LIMIT_LINES = b"ratelimit-limit: %d\r\nratelimit-remaining: %d\r\nratelimit-reset: %d\r\n"


def rate_limit_pairs(state: RateLimitState) -> Headers:
    limit, remaining, reset = state
    return (
        ("ratelimit-limit", str(limit)),
        ("ratelimit-remaining", str(remaining)),
        ("ratelimit-reset", str(reset)),
    )


def allowed_state(
    when: RateLimitHeaders, limit: RateLimit, remaining: int, reset_seconds: float
) -> RateLimitState | None:
    """The RateLimit headers of an admitted request whose most restrictive limit is `limit`,
    as the policy's `ratelimit.headers` asks: on every one, when a tenth of the limit or
    less is left (the response is then the same for every request far from its limit, built
    once, and Envoy copies no header), or never (None)."""
    if when == "always" or (when == "near_limit" and remaining * 10 <= limit.capacity):
        return (limit.capacity, remaining, math.ceil(reset_seconds))
    return None


def admitted_headers(limit: RateLimit, remaining: int, reset_seconds: float) -> Headers:
    """The RateLimit header fields of an admitted request whose most restrictive limit is
    `limit`; what a decision served from leases answers (LeaseBook.serve)."""
    return rate_limit_pairs((limit.capacity, remaining, math.ceil(reset_seconds)))
