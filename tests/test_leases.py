"""Token leases: the grant's size (pure), the lease book, and the limiter spending leases in
memory while every decision still takes from all its limits or from none. Clock injected;
the memory store, then several limiters on one real Redis."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from meshtoll.counting import algorithms
from meshtoll.counting.limits import Check, CheckResult, Increment, RateLimit
from meshtoll.counting.store import Compat
from meshtoll.envoyproxy_ratelimit.config_files import load_descriptor_configs
from meshtoll.envoyproxy_ratelimit.domains import ConfiguredDomains
from meshtoll.envoyproxy_ratelimit.strict import StrictLimiter
from meshtoll.policy.reload import PolicyHolder
from meshtoll.ratelimit.decision import Descriptor
from meshtoll.ratelimit.leases import Lease, LeaseBook
from meshtoll.ratelimit.limiter import Limiter
from meshtoll.ratelimit.verdict import admitted_headers, limit_verdict
from meshtoll.storage import MemoryCounterStore
from meshtoll.storage.redis import RedisCounterStore
from tests.client import fetch
from tests.serve import running_serve

T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC).timestamp()
_names = itertools.count()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def key() -> str:
    return f"lease_{{t{next(_names)}}}_limit"


class CountingStore(MemoryCounterStore):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def check(self, checks: Sequence[Check], now: float) -> list[CheckResult]:
        self.calls += 1
        return await super().check(checks, now)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_grant_is_an_eighth_of_what_is_left_at_most_l_minus_1_and_0_near_the_limit() -> None:
    plan = algorithms.plan(Check(key(), RateLimit(1000, "minute"), lease=15), int(T0 * 1000))
    assert algorithms.lease_grant(plan, 0, 0, int(T0 * 1000)) == 15
    assert algorithms.lease_grant(plan, 900, 0, int(T0 * 1000)) == 12  # (1000 - 900 - 1) // 8
    assert algorithms.lease_grant(plan, 991, 0, int(T0 * 1000)) == 1
    assert algorithms.lease_grant(plan, 992, 0, int(T0 * 1000)) == 0  # today's exact path
    assert algorithms.lease_grant(plan, 1000, 0, int(T0 * 1000)) == 0


def test_a_token_bucket_lease_may_be_spent_no_later_than_each_token_would_have_been_taken() -> None:
    limit = RateLimit(60, "minute", "token_bucket")  # one token a second
    now_ms = int(T0 * 1000)
    # A full bucket granted cost 1 + 3: TAT moved 4 s ahead; the leased tokens' slots are
    # 2, 3 and 4 s ahead, each usable until a second before its slot.
    lease = Lease.granted(Check(key(), limit), CheckResult(True, 4, 56, 4.0, 0.0, 3), T0)
    assert lease.take(1, now_ms + 1000)
    assert not lease.take(1, now_ms + 2001)  # the second leased token's moment has passed
    assert lease.take(1, now_ms + 2000)
    assert lease.hits == 1


def test_a_window_lease_ends_with_its_window() -> None:
    lease = Lease.granted(
        Check(key(), RateLimit(100, "minute")), CheckResult(True, 13, 87, 30.0, 0.0, 12), T0
    )
    now_ms = int(T0 * 1000)
    assert lease.take(1, now_ms + 29_999)
    assert not lease.take(1, now_ms + 30_000)


async def test_a_lease_serves_l_decisions_per_store_call_with_exact_remaining() -> None:
    store = CountingStore()
    limiter = Limiter(store, lease_max=4, clock=Clock())
    check = Check(key(), RateLimit(1000, "minute"))
    remaining = []
    for _ in range(12):
        verdict = await limiter.check([check])
        assert verdict.admitted
        remaining.append(int(dict(verdict.headers)["ratelimit-remaining"]))
    assert store.calls == 3  # each call took one decision and leased three more
    # One process: what each decision reports is what the exact path would report.
    assert remaining == list(range(999, 987, -1))


async def test_a_decision_served_partly_from_a_lease_takes_nothing_when_another_limit_refuses() -> None:
    store = CountingStore()
    clock = Clock()
    limiter = Limiter(store, lease_max=16, clock=clock)
    roomy = Check(key(), RateLimit(1000, "minute"))
    tight = Check(key(), RateLimit(3, "minute"))  # too small to lease: exact on every decision
    admitted = [(await limiter.check([roomy, tight])).admitted for _ in range(5)]
    assert admitted == [True, True, True, False, False]
    looked = await store.check([Check(roomy.key, roomy.limit, cost=0)], clock.now)
    # One grant of 15 (then 3 spent from it); the two refused decisions put theirs back.
    assert looked[0].used == 16
    verdict = await limiter.check([roomy])
    assert dict(verdict.headers)["ratelimit-remaining"] == str(1000 - 4)


async def test_a_window_lease_running_low_is_topped_up_in_the_round_trip_another_limit_makes() -> None:
    store = CountingStore()
    clock = Clock()
    limiter = Limiter(store, lease_max=4, refill_mark=0, clock=clock)  # refilled only once empty
    minute = Check(key(), RateLimit(1000, "minute"))
    hour = Check(key(), RateLimit(10_000, "hour"))
    for _ in range(2):
        assert (await limiter.check([minute, hour])).admitted  # one call: each lease 3, then 2
    clock.now += 60  # the minute's window and its lease end; the hour's keeps 2 hits
    store.calls = 0
    for _ in range(12):
        assert (await limiter.check([minute, hour])).admitted
    # The minute's call tops the hour's lease up too, so both run out together: a call per
    # 4 decisions, not one for each lease in turn (6).
    assert store.calls == 3
    # Never more than L - 1 held: the top-up asked for 1 to join the hour's 2 left.
    assert limiter.lease_hits["granted"] == 4 * 6 - 2
    await limiter.release_leases()
    looked = await store.check([Check(c.key, c.limit, cost=0) for c in (minute, hour)], clock.now)
    assert [result.used for result in looked] == [12, 14]  # every hit admitted or given back


async def test_a_decision_leases_serve_alone_is_answered_without_a_coroutine() -> None:
    limiter = Limiter(MemoryCounterStore(), lease_max=16, clock=Clock())
    roomy = Check(key(), RateLimit(1000, "minute"))
    tight = Check(key(), RateLimit(3, "minute"))
    assert limiter.check_from_leases([roomy]) is None  # nothing leased yet
    assert (await limiter.check([roomy])).admitted
    assert limiter.check_from_leases([roomy]) == (roomy.limit, 998, 60.0)
    assert limiter.check_from_leases([roomy, tight]) is None  # tight has no lease: ask the store
    assert limiter.check_from_leases([roomy]) == (roomy.limit, 997, 60.0)


@pytest.mark.parametrize(
    "answers",
    [
        [(5, 10.0), (7, 1.0)],
        [(7, 1.0), (5, 10.0)],
        [(5, 1.0), (5, 30.0)],
        [(9, 2.0)],
        [(3, 0.5), (3, 0.5), (1, 9.0)],
    ],
)
def test_the_leased_fast_verdict_is_the_general_one(answers: list[tuple[int, float]]) -> None:
    """A decision leases serve reports the limit, remaining and reset the general verdict
    would for the same answers."""
    checks = [Check(key(), RateLimit(10 + n, "minute")) for n in range(len(answers))]
    book = LeaseBook(16)
    # Grants whose remaining after the next hit, lease counted, is each answer's `left`.
    granted = [CheckResult(True, 0, left + 1 - 5, reset, 0.0, leased=5) for left, reset in answers]
    book.answered([Check(c.key, c.limit, c.cost, 15) for c in checks], granted, T0)
    served = book.serve(checks, T0)
    assert served is not None
    results = [CheckResult(True, 10 - left, left, reset, 0.0) for left, reset in answers]
    general = limit_verdict(checks, results)
    assert admitted_headers(*served) == general.headers
    assert general.deciding is not None
    assert served[0] == general.deciding[0].limit


async def test_month_and_year_quotas_and_looks_are_never_leased() -> None:
    store = CountingStore()
    limiter = Limiter(store, lease_max=16, clock=Clock())
    for check in (Check(key(), RateLimit(10**6, "month")), Check(key(), RateLimit(10**6, "minute"), cost=0)):
        for _ in range(3):
            assert (await limiter.check([check])).admitted
    assert store.calls == 6


async def test_unused_leases_go_back_to_the_store_on_release() -> None:
    store = CountingStore()
    clock = Clock()
    limiter = Limiter(store, lease_max=16, refill_mark=0, clock=clock)  # no refill in flight
    window = Check(key(), RateLimit(1000, "minute"))
    bucket = Check(key(), RateLimit(1000, "minute", "token_bucket"))
    for _ in range(3):
        assert (await limiter.check([window, bucket])).admitted
    assert await limiter.release_leases() == 2 * 13
    looked = await store.check([Check(c.key, c.limit, cost=0) for c in (window, bucket)], clock.now)
    assert [result.used for result in looked] == [3, 3]
    assert await limiter.release_leases() == 0  # the book is empty


async def test_only_one_grant_per_counter_is_asked_for_at_a_time() -> None:
    book = LeaseBook(16)
    check = Check(key(), RateLimit(1000, "minute"))
    first = book.asking([check], book.take([check], T0))
    second = book.asking([check], book.take([check], T0))
    assert [c.lease for c in first + second] == [15, 0]
    book.answered(first, None, T0)
    assert [c.lease for c in book.asking([check], book.take([check], T0))] == [15]


class GatedStore(CountingStore):
    """A store whose answers wait until the test opens the gate: decisions pile up behind
    a grant in flight as they do behind a Redis round trip under load."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.asked: list[list[Check]] = []  # each call's checks, as it arrives

    async def check(self, checks: Sequence[Check], now: float) -> list[CheckResult]:
        self.asked.append(list(checks))
        await self.gate.wait()
        await asyncio.sleep(0)  # a round trip: other decisions run before the answer
        return await super().check(checks, now)


async def test_decisions_waiting_for_a_grant_are_served_from_it_in_order_one_store_call_per_grant() -> None:
    store = GatedStore()
    limiter = Limiter(store, lease_max=4, refill_mark=0, clock=Clock())  # waits, as when refilled too late
    checks = [Check(key(), RateLimit(1000, "minute")), Check(key(), RateLimit(100_000, "day"))]
    decisions = [asyncio.ensure_future(limiter.check(checks)) for _ in range(12)]
    await asyncio.sleep(0)  # every decision has started: the first asks, the rest wait
    store.gate.set()
    verdicts = await asyncio.gather(*decisions)
    assert all(verdict.admitted for verdict in verdicts)
    # Each grant covers 3 decisions beyond its asker's: 12 decisions, 3 store calls.
    assert store.calls == 3
    remaining = [int(dict(verdict.headers)["ratelimit-remaining"]) for verdict in verdicts]
    assert remaining == sorted(remaining, reverse=True)  # served in arrival order
    assert limiter.outcomes["admitted_from_lease"] == 9


async def test_a_waiter_woken_to_ask_that_gives_up_hands_the_turn_to_the_next() -> None:
    book = LeaseBook(2)
    check = Check(key(), RateLimit(1000, "minute"))
    asked = book.asking([check], book.take([check], T0))
    waits = []
    for _ in range(3):
        wait = book.wait_for_grants([check], book.take([check], T0))
        assert wait is not None  # a grant is in flight for its counter
        waits.append(wait)
    first, second, third = waits
    book.answered(asked, [CheckResult(True, 2, 998, 30.0, 0.0, leased=1)], T0)
    assert first.future.result() is not None  # served from the grant of one
    assert second.future.result() is None  # woken to ask, the counter reserved for it
    assert second.reserved == {check.key}
    assert not third.future.done()  # waits for the grant `second` will ask for
    book.done_waiting(second, T0)  # cancelled before it asked
    assert third.future.result() is None
    assert third.reserved == {check.key}
    assert [c.lease for c in book.asking([check], book.take([check], T0), third)] == [1]


async def test_a_waiter_whose_call_fails_as_it_is_woken_to_ask_hands_the_turn_to_the_next() -> None:
    """A waiter answered by a call (`then`, the HTTP transport's) that raises as it is woken
    to ask the store: the failure is its answer, the counter reserved for it goes to the next
    waiter, and the grant's arrival that woke it (another decision's store call) goes on."""
    book = LeaseBook(2)
    check = Check(key(), RateLimit(1000, "minute"))
    asked = book.asking([check], book.take([check], T0))
    waits = [book.queue_for_grants([check], T0) for _ in range(3)]
    first, second, third = [wait for wait in waits if wait is not None]

    def fails(answer: object) -> None:
        raise RuntimeError("no Task could be started")

    second.then = fails
    book.answered(asked, [CheckResult(True, 2, 998, 30.0, 0.0, leased=1)], T0)
    assert first.future.result() is not None  # served from the grant of one
    assert isinstance(second.future.exception(), RuntimeError)
    assert third.future.result() is None  # woken to ask in its place
    assert third.reserved == {check.key}


async def settled() -> None:
    """Until every Task the test started has run as far as it can (a gate stops it)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_lease_at_its_refill_mark_asks_for_the_next_grant_and_goes_on_serving() -> None:
    store = GatedStore()
    store.gate.set()
    limiter = Limiter(store, lease_max=16, clock=Clock())
    check = Check(key(), RateLimit(10_000, "minute"))
    assert (await limiter.check([check])).admitted  # its cost and a grant of 15
    store.gate.clear()
    # One decision leaves the lease at 14, under its mark (a grant's worth, L - 1 = 15).
    assert limiter.check_from_leases([check]) is not None
    await settled()
    # Asked in the background, no decision waiting for it: what the lease lacks to hold
    # L - 1 + m = 30, the cost included (no decision spends it).
    assert [[(c.cost, c.lease) for c in asked] for asked in store.asked[1:]] == [[(1, 15)]]
    for _ in range(14):  # the lease's last hits go on serving while the refill is in flight
        assert limiter.check_from_leases([check]) is not None
    assert limiter.check_from_leases([check]) is None
    waiting = limiter.waiting_for_grants([check])
    assert waiting is not None  # found empty: waits for the refill, asks nothing itself
    store.gate.set()
    served = await waiting.future
    assert served == (check.limit, 10_000 - 17, 60.0)  # 17 admitted, remaining exact
    limiter.done_waiting(waiting)
    await settled()
    assert limiter.lease_hits["granted"] == 15 + 16 + 15  # the refill, then the next


async def test_a_refill_takes_the_decisions_other_low_leases_along_so_they_run_out_together() -> None:
    store = GatedStore()
    store.gate.set()
    clock = Clock()
    limiter = Limiter(store, lease_max=16, clock=clock)
    second = Check(key(), RateLimit(10**6, "second"))
    day = Check(key(), RateLimit(10**8, "day"))
    assert (await limiter.check([second, day])).admitted  # a grant of 15 each
    assert limiter.check_from_leases([second, day]) is not None
    await settled()  # refilled together: 30 each
    for _ in range(10):
        assert limiter.check_from_leases([second, day]) is not None
    clock.now += 1  # the second's window ends with its lease; the day's has 20 hits
    # A new second's lease only; the day's lease served it (19 left, over its mark of 15).
    assert (await limiter.check([second, day])).admitted
    store.gate.clear()
    assert limiter.check_from_leases([second, day]) is not None  # the second's at 14, the day's 18
    await settled()
    # One request for both (the day's lease within half a grant of its mark), each up to
    # L - 1 + m = 30 hits: the second's 16, the day's 12.
    assert [[(c.key, c.cost + c.lease) for c in asked] for asked in store.asked[3:]] == [
        [(second.key, 16), (day.key, 12)]
    ]
    store.gate.set()
    await settled()


@pytest.mark.parametrize("cost", [1, 3])
async def test_a_process_holds_at_most_its_lease_at_the_refill_mark_and_the_next_grant(cost: int) -> None:
    """README, Token leases: per counter at most c x (L - 1 + m) hits reserved and unspent,
    m = L - 1 by default: a lease and a grant, reached when the refill lands before a
    decision spends from the lease. Every hit is spent or given back."""
    store = GatedStore()
    store.gate.set()
    clock = Clock()
    limiter = Limiter(store, lease_max=16, clock=clock)
    check = Check(key(), RateLimit(100_000, "minute", "fixed_window"), cost=cost)
    bound = cost * (15 + 15)

    async def unspent(admitted: int) -> int:
        (looked,) = await store.check([Check(check.key, check.limit, cost=0)], clock.now)
        return looked.used - admitted * cost

    admitted = 1
    assert (await limiter.check([check])).admitted
    store.gate.clear()
    assert limiter.check_from_leases([check]) is not None
    admitted += 1
    await settled()  # the refill is asked for and held at the gate
    store.gate.set()
    await settled()  # and lands: the lease's 14 decisions' hits and the new 16
    assert await unspent(admitted) == bound
    for n in range(200):  # decisions from leases, refills landing in between, never more held
        if n % 7 == 0:
            await settled()
        if limiter.check_from_leases([check]) is None:
            assert (await limiter.check([check])).admitted
        admitted += 1
        assert await unspent(admitted) <= bound
    await settled()
    held = await unspent(admitted)
    assert await limiter.release_leases() == held
    assert await unspent(admitted) == 0


async def test_a_refilled_token_bucket_lease_spends_its_old_tokens_first_none_past_its_slot() -> None:
    store = GatedStore()
    store.gate.set()
    clock = Clock()
    limiter = Limiter(store, lease_max=16, clock=clock)
    other = Limiter(store, clock=clock)  # another process, no lease
    check = Check(key(), RateLimit(60, "minute", "token_bucket", burst=1000))  # a token a second
    assert (await limiter.check([check])).admitted  # TAT 16 s ahead: the cost and 15 leased
    store.gate.clear()
    assert limiter.check_from_leases([check]) is not None  # 14 left: the refill is asked for
    await settled()  # and held
    # Another process takes a token: the refill's tokens' slots come one interval later.
    store.gate.set()
    assert (await other.check([check])).admitted
    await settled()
    # The old lease's 14 tokens may be used until 2, 3, ... 15 s, the refill's 16 (after
    # the other process's token) until 17 s, 18 s, ...: spent in order, each at the last
    # moment the merged lease allows, none later than its own slot.
    for second in range(2, 17):
        clock.now = T0 + second
        assert limiter.check_from_leases([check]) is not None
    clock.now = T0 + 17.5  # the next token's own slot would allow it; the merged lease's
    assert limiter.check_from_leases([check]) is None  # earlier timing refuses: lost, never late
    await settled()


@pytest.mark.integration
@pytest.mark.parametrize("algorithm", ["fixed_window", "sliding_window", "token_bucket"])
async def test_several_leasing_limiters_on_one_redis_never_overshoot(redis_url: str, algorithm: str) -> None:
    """Four processes' worth of limiters, each with its own Redis connection and leases of
    up to 16, race for one limit (and a roomier second one) in one window."""
    clock = Clock(T0 + 5)
    stores = [RedisCounterStore(redis_url, timeout_ms=2000) for _ in range(4)]
    limiters = [Limiter(store, lease_max=16, clock=clock) for store in stores]
    limit = 300
    checks = [
        Check(key(), RateLimit(limit, "minute", algorithm)),  # type: ignore[arg-type]
        Check(key(), RateLimit(10 * limit, "hour")),
    ]

    async def checked(limiter: Limiter) -> bool:
        return (await limiter.check(checks)).admitted

    admitted, counted, looked = await race(stores, limiters, checks, clock, checked, rounds=150)
    # Never past the limit; short of it by at most the four limiters' unused leases,
    # P x (min(L - 1, (limit - 1) // 8) + m) = 4 x (15 + 15), which go back when they stop.
    assert limit - 4 * (15 + 15) <= admitted <= limit
    assert counted.used <= limit
    # Demand was four times the limit, so every lease of the first limit was spent; the
    # second's unspent leases all went back (its counter is the decisions admitted).
    assert [result.used for result in looked] == [admitted, admitted]


async def race(
    stores: Sequence[RedisCounterStore],
    limiters: Sequence[Limiter],
    checks: Sequence[Check],
    clock: Clock,
    decide: Callable[[Limiter], Awaitable[bool]],
    rounds: int,
) -> tuple[int, CheckResult, list[CheckResult]]:
    """Eight clients, two for each limiter, each deciding `rounds` times: the decisions
    admitted, what Redis counted for the first check at the end, and what it holds for each
    check once every limiter has given its unused leases back (the stores closed after)."""

    async def client(limiter: Limiter) -> int:
        admitted = 0
        for _ in range(rounds):
            admitted += await decide(limiter)
            await asyncio.sleep(0)
        return admitted

    try:
        counts = await asyncio.gather(*(client(limiters[n % len(limiters)]) for n in range(8)))
        (counted,) = await stores[0].check(checks[:1], clock.now)
        for each in limiters:
            await each.release_leases()
        looked = await stores[0].check([Check(c.key, c.limit, cost=0) for c in checks], clock.now)
    finally:
        for store in stores:
            await store.close()
    return sum(counts), counted, looked


class RefillCountingStore(RedisCounterStore):
    """Counts the calls that are refills: made by the limiter's refill Task, not by a
    decision."""

    refills = 0

    async def check(self, checks: Sequence[Check], now: float) -> list[CheckResult]:
        task = asyncio.current_task()
        if task is not None and task.get_coro().__qualname__ == "Limiter._refilled":  # type: ignore[union-attr]
            self.refills += 1
        return await super().check(checks, now)


@pytest.mark.integration
@pytest.mark.parametrize("algorithm", ["fixed_window", "sliding_window", "token_bucket"])
async def test_leasing_limiters_with_refills_in_flight_never_overshoot(
    redis_url: str, algorithm: str
) -> None:
    """As above, decided as the authorizer decides (from the leases at once, else waiting
    for a grant in flight, else asking), with a limit far enough from its grants that
    leases are refilled early all the way to the last eight grants: the refills of four
    processes in flight together while decisions spend what their leases have left."""
    clock = Clock(T0 + 5)
    stores = [RefillCountingStore(redis_url, timeout_ms=2000) for _ in range(4)]
    limiters = [Limiter(store, lease_max=16, clock=clock) for store in stores]
    limit = 2000
    checks = [
        Check(key(), RateLimit(limit, "minute", algorithm)),  # type: ignore[arg-type]
        Check(key(), RateLimit(10 * limit, "hour")),
    ]

    async def decided(limiter: Limiter) -> bool:
        if limiter.check_from_leases(checks) is not None:
            return True
        wait = limiter.waiting_for_grants(checks)
        if wait is None:
            return (await limiter.check(checks)).admitted
        try:
            if await wait.future is not None:
                return True
            return (await limiter.check_after_wait(checks, wait)).admitted
        finally:
            limiter.done_waiting(wait)

    admitted, counted, looked = await race(stores, limiters, checks, clock, decided, rounds=300)
    assert all(store.refills > 5 for store in stores)
    # README, Token leases: at most P x (min(L - 1, (limit - 1) // 8) + m) short, m = L - 1.
    assert limit - 4 * (15 + 15) <= admitted <= limit
    assert counted.used <= limit
    assert [result.used for result in looked] == [admitted, admitted]


@pytest.mark.integration
def test_a_stopping_serve_gives_its_unused_leases_back_to_redis(redis_url: str, tmp_path: Path) -> None:
    api_key = "k-lease-return"
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "plans: {roomy: {limits: [{requests: 1000, per: hour}, {requests: 100000, per: day, name: daily}]}}\n"
        f"tenants: {{leaser: {{plan: roomy, api_keys: [{{id: k, sha256: {sha256(api_key)}}}]}}}}\n"
    )
    with running_serve(
        tmp_path, "--policy", str(policy), "--redis-url", redis_url, "--lease-max", "16"
    ) as serve:
        for _ in range(5):
            reply = fetch(f"http://127.0.0.1:{serve.http_authz_port}/v1/x", headers={"x-api-key": api_key})
            assert reply.status == 200
        while_serving = quota_used(serve.admin_url)
        serve.child.stop()
    # One grant of 15, 4 spent, and the refill the second request started in the background
    # (16: 30 held with the 14 left), if it has landed.
    assert while_serving in ({"1000/hour": 5 + 11, "daily": 5 + 11}, {"1000/hour": 5 + 27, "daily": 5 + 27})
    assert asyncio.run(counted(redis_url, policy)) == [5, 5]


def quota_used(admin_url: str) -> dict[str, int]:
    quota = fetch(f"{admin_url}/api/tenants/leaser/quota").json()
    return {entry["name"]: entry["used"] for entry in quota["limits"]}


async def counted(redis_url: str, policy: Path) -> list[int]:
    compiled = PolicyHolder.from_file(policy).current
    store = RedisCounterStore(redis_url, timeout_ms=1000)
    try:
        looks = [Check(c.key, c.limit, cost=0) for c in compiled.limits.tenant_checks("leaser")]
        return [result.used for result in await store.check(looks, time.time())]
    finally:
        await store.close()


class IncrementCountingStore(CountingStore):
    def __init__(self) -> None:
        super().__init__()
        self.increments = 0

    async def increment(
        self, increments: Sequence[Increment], now: float, *, stop_when_over: bool = False
    ) -> list[int]:
        self.increments += 1
        return await super().increment(increments, now, stop_when_over=stop_when_over)


@pytest.mark.parametrize(("compat", "store_calls"), [("meshtoll", 1), ("strict", 4)])
async def test_the_rls_leases_in_meshtoll_compatibility_and_never_in_strict(
    tmp_path: Path, compat: Compat, store_calls: int
) -> None:
    (tmp_path / "config.yaml").write_text(
        "domain: api\ndescriptors:\n  - key: client\n    rate_limit: {unit: hour, requests_per_unit: 1000}\n"
    )
    configs = load_descriptor_configs(tmp_path)
    store = IncrementCountingStore()
    limiter = Limiter(store, lease_max=16, clock=Clock())
    service = ConfiguredDomains(lambda: configs, StrictLimiter(limiter), compat=compat)
    for left in (999, 998, 997, 996):
        decision = await service.decide("api", [Descriptor((("client", "c1"),))], 1)
        # Strict answers as envoyproxy/ratelimit counts: every hit, remaining after it.
        assert (decision.over_limit, decision.statuses[0].remaining) == (False, left)
    assert store.calls + store.increments == store_calls
