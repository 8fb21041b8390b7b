"""The counting algorithms, as pure functions over stored numbers, in integer milliseconds.

`storage/lua/check.lua` is the same code for Redis; keep the two in step (the contract
tests in tests/test_counter_store_contract.py run both). Every check has two counter slots:
fixed window uses the first (the current window's count), sliding window both (current,
previous window), token bucket the first (its theoretical arrival time, TAT).

Token leases: a check may ask to reserve `lease` hits beyond its cost. The store grants
(`lease_grant`) only what fits under the limit after the cost, never more than an eighth of
it (LEASE_SHARE), in whole multiples of the cost; near the limit the grant shrinks to 0 and
the decision is today's exact one. A grant is consumed with the cost, so the store never
counts past the limit; the caller spends it in memory (ratelimit/leases.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from meshtoll.counting.limits import Check, CheckResult, Increment, RateLimit, Unused
from meshtoll.counting.periods import nominal_seconds, previous_window, window

FIXED, SLIDING, BUCKET = 1, 2, 3
ALGORITHM_CODES = {"fixed_window": FIXED, "sliding_window": SLIDING, "token_bucket": BUCKET}
EXPIRY_SLACK_MS = 1000
# A lease takes at most this share of what a limit has left: several processes leasing from
# one counter leave each other room, and the grant shrinks to nothing near the limit.
LEASE_SHARE = 8


@dataclass(frozen=True, slots=True)
class Plan:
    """A check made concrete at one moment: its keys and the numbers the algorithm needs."""

    keys: tuple[str, str]
    algorithm: int
    requests: int
    cost: int
    shadow: bool
    a: int  # fixed: window end; sliding: window start; bucket: emission interval (ms)
    b: int  # fixed: unused; sliding: window end; bucket: capacity
    expire_ms: int  # how long the first key must live after a write, from now
    lease: int = 0  # hits the caller would reserve beyond the cost (0 for a look or a shadow)

    def arguments(self) -> list[int]:
        return [
            self.algorithm, self.requests, self.cost, int(self.shadow), self.a, self.b, self.expire_ms,
            self.lease,
        ]  # fmt: skip


def bucket_interval_ms(limit: RateLimit) -> int:
    """A token bucket's emission interval: one token every this many milliseconds."""
    return max(1, round(nominal_seconds(limit.period) * 1000 / max(limit.requests, 1)))


def plan(check: Check, now_ms: int) -> Plan:
    limit = check.limit
    algorithm = ALGORITHM_CODES[limit.algorithm]
    now = now_ms / 1000
    lease = check.lease if check.cost > 0 and not limit.shadow else 0
    if algorithm == BUCKET:
        interval = bucket_interval_ms(limit)
        expire = interval * limit.capacity + EXPIRY_SLACK_MS
        key = f"{check.key}_tb"
        return Plan(
            (key, key), BUCKET, limit.requests, check.cost, limit.shadow, interval, limit.capacity, expire,
            lease,
        )  # fmt: skip
    start, end = window(limit.period, now)
    current = f"{check.key}_{start}"
    if algorithm == FIXED:
        expire = end * 1000 - now_ms + EXPIRY_SLACK_MS
        return Plan(
            (current, current), FIXED, limit.requests, check.cost, limit.shadow, end * 1000, 0, expire,
            lease,
        )  # fmt: skip
    previous_start, _ = previous_window(limit.period, now)
    # The current window's count is read again as the previous one during the next window.
    expire = (end - start) * 2000 - (now_ms - start * 1000) + EXPIRY_SLACK_MS
    keys = (current, f"{check.key}_{previous_start}")
    return Plan(
        keys, SLIDING, limit.requests, check.cost, limit.shadow, start * 1000, end * 1000, expire, lease
    )


def admits(p: Plan, first: int, second: int, now_ms: int) -> bool:
    """Would this check admit its cost (a cost of 0: one more hit) given its stored values."""
    want = max(p.cost, 1)
    if p.algorithm == FIXED:
        return first + want <= p.requests
    if p.algorithm == SLIDING:
        return _estimate(p, first, second, now_ms) + want <= p.requests
    tat = max(first, now_ms)
    return tat + want * p.a - p.b * p.a <= now_ms


def lease_grant(p: Plan, first: int, second: int, now_ms: int) -> int:
    """The hits reserved beyond the cost for an admitted decision: at most `p.lease`, at most
    an eighth of what the limit has left after the cost, in whole multiples of the cost."""
    if p.lease <= 0 or p.cost <= 0 or p.shadow:
        return 0
    room = _free(p, first, second, now_ms) - p.cost
    grant = min(p.lease, room // LEASE_SHARE)
    return max(0, grant // p.cost * p.cost)


def _free(p: Plan, first: int, second: int, now_ms: int) -> int:
    """Hits the limit would still admit now."""
    if p.algorithm == FIXED:
        return p.requests - first
    if p.algorithm == SLIDING:
        return math.floor(p.requests - _estimate(p, first, second, now_ms))
    return (now_ms - max(first, now_ms) + p.b * p.a) // p.a


def consumed(p: Plan, first: int, now_ms: int, grant: int = 0) -> int:
    """The first slot's value after consuming the cost and a lease grant."""
    if p.algorithm == BUCKET:
        return max(first, now_ms) + (p.cost + grant) * p.a
    return first + p.cost + grant


def after_release(p: Plan, value: int, unused: Unused) -> int | None:
    """The first slot's value once unused leased hits go back, or None when none can: a
    window's counter gives back at most what it holds (a missing one has expired with its
    window); a token bucket only while its TAT is the one the lease left."""
    if p.algorithm == BUCKET:
        return value - unused.hits * p.a if value == unused.bucket_tat_ms else None
    return value - min(unused.hits, value) if value > 0 else None


def release_arguments(p: Plan, unused: Unused) -> list[int]:
    """check.lua's sibling release.lua reads these per key: hits, bucket interval (0 for a
    window), the TAT the lease left."""
    return [unused.hits, p.a if p.algorithm == BUCKET else 0, unused.bucket_tat_ms]


def result(p: Plan, first: int, second: int, allowed: bool, now_ms: int, leased: int = 0) -> CheckResult:
    """The result after the decision; `first` is the value after any consumption (a lease
    grant of `leased` hits included: it counts as used)."""
    if p.algorithm == FIXED:
        reset = p.a - now_ms
        remaining = max(0, p.requests - first)
        return CheckResult(allowed, first, remaining, reset / 1000, 0.0 if allowed else reset / 1000, leased)
    if p.algorithm == SLIDING:
        estimate = _estimate(p, first, second, now_ms)
        remaining = max(0, math.floor(p.requests - estimate))
        reset = p.b - now_ms
        return CheckResult(
            allowed,
            math.ceil(estimate),
            remaining,
            reset / 1000,
            _sliding_retry(p, first, second, allowed, now_ms),
            leased,
        )
    tat = max(first, now_ms)
    remaining = min(p.b, max(0, (now_ms - (tat - p.b * p.a)) // p.a))
    retry = 0 if allowed else tat + max(p.cost, 1) * p.a - p.b * p.a - now_ms
    return CheckResult(
        allowed, p.b - remaining, remaining, (tat - now_ms) / 1000, max(0, retry) / 1000, leased
    )


def _estimate(p: Plan, current: int, previous: int, now_ms: int) -> float:
    # The previous window still counts for the share of it the sliding period covers.
    weight = (p.b - now_ms) / (p.b - p.a)
    return previous * weight + current


def _sliding_retry(p: Plan, current: int, previous: int, allowed: bool, now_ms: int) -> float:
    if allowed:
        return 0.0
    room = p.requests - current - max(p.cost, 1)
    if room < 0 or previous == 0:
        return (p.b - now_ms) / 1000  # the current window alone is full: wait for the next
    # previous * (end - t) / length <= room  <=>  t >= end - room * length / previous
    moment = p.b - room * (p.b - p.a) / previous
    return max(0.0, moment - now_ms) / 1000


def hits_to_add(current: Sequence[int], increments: Sequence[Increment], stop_when_over: bool) -> list[int]:
    """What envoyproxy/ratelimit adds to each counter. Normally every hit, refused or not;
    when counting stops at the limit and any counter would pass its limit, only the counters
    that would pass it grow (its STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT)."""
    hits = [increment.hits for increment in increments]
    if not stop_when_over:
        return hits
    passes = [value + each.hits > each.limit for value, each in zip(current, increments, strict=True)]
    if not any(passes):
        return hits
    return [add if passing else 0 for add, passing in zip(hits, passes, strict=True)]
