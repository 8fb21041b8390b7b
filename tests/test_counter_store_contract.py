"""One contract, every counter store: the memory store and the Redis store (a real
redis-server) must count identically. Time is injected; no test sleeps across a window."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import redis.asyncio

from meshtoll.counting.limits import Check, Increment, RateLimit, Unused
from meshtoll.storage import CounterStore, MemoryCounterStore
from meshtoll.storage.redis import RedisCounterStore
from tests.conftest import ON_REDIS

T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC).timestamp()
_names = itertools.count()


@pytest.fixture(params=["memory", ON_REDIS])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[CounterStore]:
    if request.param == "memory":
        yield MemoryCounterStore()
        return
    url = request.getfixturevalue("redis_url")
    client = redis.asyncio.Redis.from_url(url)
    await client.flushdb()
    await client.aclose()
    found = RedisCounterStore(url, timeout_ms=500)
    yield found
    await found.close()


def key() -> str:
    return f"test_{{t{next(_names)}}}_limit"


async def admitted(store: CounterStore, checks: list[Check], now: float, times: int) -> int:
    count = 0
    for _ in range(times):
        results = await store.check(checks, now)
        count += all(
            result.allowed or check.limit.shadow for check, result in zip(checks, results, strict=True)
        )
    return count


@pytest.mark.parametrize("algorithm", ["fixed_window", "sliding_window", "token_bucket"])
@pytest.mark.parametrize("period", ["second", "minute", "day"])
async def test_exactly_n_are_admitted_then_refused(store: CounterStore, algorithm: str, period: str) -> None:
    check = Check(key(), RateLimit(5, period, algorithm))  # type: ignore[arg-type]
    assert await admitted(store, [check], T0, 8) == 5
    (last,) = await store.check([check], T0)
    assert (last.allowed, last.remaining) == (False, 0)
    assert last.retry_after > 0


async def test_fixed_window_resets_at_the_window_boundary(store: CounterStore) -> None:
    check = Check(key(), RateLimit(3, "minute"))
    assert await admitted(store, [check], T0 + 59.9, 5) == 3
    (refused,) = await store.check([check], T0 + 59.9)
    assert refused.retry_after == pytest.approx(0.1, abs=0.002)
    assert await admitted(store, [check], T0 + 60, 5) == 3


async def test_monthly_quota_rolls_over_on_the_first_of_the_month_in_utc(store: CounterStore) -> None:
    check = Check(key(), RateLimit(2, "month"))
    last_second = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC).timestamp()
    assert await admitted(store, [check], last_second, 3) == 2
    (refused,) = await store.check([check], last_second)
    assert refused.retry_after == pytest.approx(1.0)
    assert await admitted(store, [check], last_second + 1, 3) == 2


async def test_cost_consumes_several_hits_and_zero_only_looks(store: CounterStore) -> None:
    limit = RateLimit(10, "minute")
    name = key()
    (first,) = await store.check([Check(name, limit, cost=4)], T0)
    assert (first.allowed, first.used, first.remaining) == (True, 4, 6)
    (look,) = await store.check([Check(name, limit, cost=0)], T0)
    assert (look.allowed, look.used, look.remaining) == (True, 4, 6)
    (too_big,) = await store.check([Check(name, limit, cost=7)], T0)
    assert (too_big.allowed, too_big.used) == (False, 4)


async def test_a_refused_decision_consumes_nothing_from_any_limit(store: CounterStore) -> None:
    per_second = Check(key(), RateLimit(100, "second"))
    daily = Check(per_second.key + "_daily", RateLimit(2, "day"))
    assert await admitted(store, [per_second, daily], T0, 5) == 2
    (second, day) = await store.check([per_second, daily], T0)
    assert (second.used, day.used) == (2, 2)


async def test_shadow_limits_count_but_never_refuse(store: CounterStore) -> None:
    shadow = Check(key(), RateLimit(1, "minute", shadow=True))
    assert await admitted(store, [shadow], T0, 4) == 4
    (look,) = await store.check([Check(shadow.key, shadow.limit, cost=0)], T0)
    assert (look.allowed, look.used) == (False, 4)


async def test_zero_requests_bans(store: CounterStore) -> None:
    assert await admitted(store, [Check(key(), RateLimit(0, "second"))], T0, 3) == 0


async def test_token_bucket_bursts_to_capacity_then_refills_at_its_rate(store: CounterStore) -> None:
    bucket = Check(key(), RateLimit(10, "second", "token_bucket", burst=20))
    assert await admitted(store, [bucket], T0, 25) == 20
    assert await admitted(store, [bucket], T0 + 0.1, 3) == 1  # 10/s: one token per 100 ms
    (later,) = await store.check([Check(bucket.key, bucket.limit, cost=0)], T0 + 2.1)
    assert later.remaining == 20  # full again after two seconds


async def test_sliding_window_weighs_the_previous_window(store: CounterStore) -> None:
    check = Check(key(), RateLimit(10, "minute", "sliding_window"))
    assert await admitted(store, [check], T0 + 30, 10) == 10
    # 15 s into the next minute, 3/4 of the previous window still counts: 7.5 of 10 used.
    assert await admitted(store, [check], T0 + 75, 5) == 2
    # 45 s in, a quarter of it counts: 2.5 + 2 used, room for exactly 5 more.
    assert await admitted(store, [check], T0 + 105, 8) == 5


async def test_reset_and_remaining_report_the_window(store: CounterStore) -> None:
    (result,) = await store.check([Check(key(), RateLimit(5, "hour"))], T0 + 600)
    assert (result.used, result.remaining) == (1, 4)
    assert result.reset_seconds == pytest.approx(3000)


ALGORITHMS = ["fixed_window", "sliding_window", "token_bucket"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_a_lease_is_granted_within_the_limit_and_shrinks_to_nothing_near_it(
    store: CounterStore, algorithm: str
) -> None:
    check = Check(key(), RateLimit(100, "minute", algorithm), lease=15)  # type: ignore[arg-type]
    grants = []
    used = 0
    while True:
        (result,) = await store.check([check], T0)
        if not result.allowed:
            break
        grants.append(result.leased)
        used += 1 + result.leased
        assert result.used == used  # the grant is consumed with the cost
    # At most L - 1 and at most an eighth of what is left after the cost; 0 near the limit.
    assert grants[:4] == [12, 10, 9, 8]
    assert grants[-8:] == [0] * 8
    assert used == 100


async def test_a_lease_is_taken_in_whole_multiples_of_the_cost(store: CounterStore) -> None:
    (result,) = await store.check([Check(key(), RateLimit(1000, "minute"), cost=7, lease=70)], T0)
    assert (result.used, result.leased) == (7 + 70, 70)
    (result,) = await store.check([Check(key(), RateLimit(200, "minute"), cost=7, lease=70)], T0)
    assert result.leased == 21  # (200 - 7) // 8 = 24, rounded down to a multiple of 7


async def test_a_refused_decision_grants_no_lease_from_any_limit(store: CounterStore) -> None:
    roomy = Check(key(), RateLimit(1000, "minute"), lease=15)
    full = Check(key(), RateLimit(1, "minute"), lease=15)
    assert await admitted(store, [full], T0, 1) == 1
    room, closed = await store.check([roomy, full], T0)
    assert (room.allowed, room.leased, room.used, closed.allowed) == (True, 0, 0, False)


async def test_looks_and_shadow_limits_never_lease(store: CounterStore) -> None:
    look = Check(key(), RateLimit(1000, "minute"), cost=0, lease=15)
    shadow = Check(key(), RateLimit(1000, "minute", shadow=True), lease=15)
    results = await store.check([look, shadow], T0)
    assert [(result.leased, result.used) for result in results] == [(0, 0), (0, 1)]


@pytest.mark.parametrize("algorithm", ["fixed_window", "sliding_window"])
async def test_unused_leased_hits_of_a_window_go_back(store: CounterStore, algorithm: str) -> None:
    check = Check(key(), RateLimit(100, "minute", algorithm), lease=15)  # type: ignore[arg-type]
    (granted,) = await store.check([check], T0)
    assert granted.leased == 12
    assert await store.release([Unused(check, 10)], T0 + 1) == 10  # 2 of the 12 were used
    (looked,) = await store.check([Check(check.key, check.limit, cost=0)], T0 + 1)
    assert looked.used == 3
    # In the next window the old counter is not this one: nothing goes back twice or wrongly.
    assert await store.release([Unused(check, 5)], T0 + 60) == 0


async def test_a_token_bucket_takes_a_lease_back_only_while_nothing_took_from_it(store: CounterStore) -> None:
    check = Check(key(), RateLimit(60, "minute", "token_bucket"), lease=15)
    (granted,) = await store.check([check], T0)
    assert granted.leased == 7  # (60 - 1) // 8
    tat = int(T0 * 1000) + round(granted.reset_seconds * 1000)
    assert await store.release([Unused(check, 7, tat)], T0) == 7
    (looked,) = await store.check([Check(check.key, check.limit, cost=0)], T0)
    assert looked.remaining == 59
    (granted,) = await store.check([check], T0)
    tat = int(T0 * 1000) + round(granted.reset_seconds * 1000)
    await store.check([Check(check.key, check.limit)], T0)  # another process took a token since
    assert await store.release([Unused(check, granted.leased, tat)], T0) == 0


@pytest.mark.integration
@pytest.mark.parametrize("algorithm", ["fixed_window", "token_bucket", "sliding_window"])
async def test_concurrent_callers_on_two_connections_never_overshoot(redis_url: str, algorithm: str) -> None:
    stores = [RedisCounterStore(redis_url, timeout_ms=2000) for _ in range(2)]
    check = Check(key(), RateLimit(50, "minute", algorithm))  # type: ignore[arg-type]
    try:
        results = await asyncio.gather(*(stores[n % 2].check([check], T0) for n in range(200)))
    finally:
        for each in stores:
            await each.close()
    assert sum(result.allowed for (result,) in results) == 50


@pytest.mark.integration
async def test_every_redis_counter_expires(redis_url: str) -> None:
    store = RedisCounterStore(redis_url, timeout_ms=500)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.flushdb()
        for algorithm in ("fixed_window", "sliding_window", "token_bucket"):
            await store.check([Check(key(), RateLimit(5, "minute", algorithm))], T0 + 10)
        await store.check([Check(key(), RateLimit(5, "month"))], T0)
        names = await client.keys("*")
        assert len(names) == 4
        ttls = [await client.pttl(name) for name in names]
        assert all(ttl > 0 for ttl in ttls), ttls
    finally:
        await store.close()
        await client.aclose()


async def test_increment_counts_every_hit_refused_or_not_and_refreshes_expiry(store: CounterStore) -> None:
    counter = Increment(key(), 3, 5, 60)
    counts = [await store.increment([counter], T0) for _ in range(3)]
    assert counts == [[3], [6], [9]]
    assert await store.increment([Increment(counter.key, 0, 5, 60)], T0 + 59.5) == [9]
    assert await store.increment([Increment(counter.key, 0, 5, 60)], T0 + 119) == [9]


async def test_increment_that_stops_at_the_limit_grows_only_the_passing_counters(store: CounterStore) -> None:
    roomy, tight = Increment(key(), 1, 20, 60), Increment(key(), 1, 1, 60)
    assert await store.increment([roomy, tight], T0, stop_when_over=True) == [1, 1]
    assert await store.increment([roomy, tight], T0, stop_when_over=True) == [1, 2]
    assert await store.increment([roomy, tight], T0) == [2, 3]
