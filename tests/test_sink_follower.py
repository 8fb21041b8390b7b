"""The sink that follows the usage ledger, against local stand-ins of OpenMeter, Lago and
Stripe over real HTTP (tests/billing_receivers.py): every record arrives once in effect
through every scripted failure, refused records are quarantined and replayable, the lease
lets one follower deliver at a time, and the clock, the sleeps and the jitter are the
test's (no backoff is slept through)."""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pytest
import redis.asyncio

from meshtoll.keys import ledger_appended_key, ledger_key
from meshtoll.meter.follower import LedgerFollower
from meshtoll.sinks.delivery import TOO_OLD, UNCONFIRMED, Sink
from meshtoll.sinks.names import DefaultNames, Target
from meshtoll.sinks.state import SinkStateStore
from meshtoll.storage import MemorySinkStateStore, MemoryUsageStore
from meshtoll.storage.usage_redis import RedisUsageStore
from meshtoll.targets import open_sink
from meshtoll.usage.records import UsageRecord
from meshtoll.usage.store import UsageStore
from tests.billing_receivers import Receiver, Scripted, running_receiver
from tests.waiting import eventually_async

NOW = 1_796_000_000.0  # 2026-11-30
_ids = itertools.count()


class Clock:
    """The test's time: sleeping moves it, and every sleep is remembered."""

    def __init__(self) -> None:
        self.now = NOW
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def record(tenant: str = "acme", at: float = NOW - 60, **fields: object) -> UsageRecord:
    found = UsageRecord(
        f"req-{next(_ids)}", at, tenant, "ci", "pro", "search", "GET", 200, 10, 200, 1.5, 5
    )  # fmt: skip
    return replace(found, **fields)  # type: ignore[arg-type]


_OPENED: list[Sink] = []


def opened(sink: Sink) -> Sink:
    """A sink that is closed when the test ends (its connections kept alive until then)."""
    _OPENED.append(sink)
    return sink


@pytest.fixture(autouse=True)
async def close_sinks() -> AsyncIterator[None]:
    yield
    while _OPENED:
        await _OPENED.pop().close()


@pytest.fixture(params=["openmeter", "lago", "stripe"])
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    with running_receiver(request.param) as found:
        yield found


def follower(
    receiver: Receiver,
    usage: UsageStore,
    state: SinkStateStore,
    clock: Clock,
    *,
    owner: str = "one",
    timeout: float = 5.0,
) -> LedgerFollower:
    target: Target = receiver.target  # type: ignore[assignment]
    environ = {
        f"MESHTOLL_{name}": receiver.token for name in ("OPENMETER_TOKEN", "LAGO_API_KEY", "STRIPE_API_KEY")
    }
    sink = opened(
        open_sink(target, receiver.url, DefaultNames, environ, cloudevents_source="meshtoll", timeout=timeout)
    )
    return LedgerFollower(
        sink,
        usage,
        state,
        owner=owner,
        start=0.0,
        clock=clock,
        sleep=clock.sleep,
        random=random.Random(7).random,
    )


async def idle(receiver: Receiver) -> None:
    """Until the receiver has answered every request (a hanging one answers late)."""
    await eventually_async(
        lambda: receiver.busy, lambda busy: busy == 0, timeout=10, message="the receiver never finished"
    )


async def drain(*followers: LedgerFollower) -> None:
    """Step every follower until none has anything left (a bounded number of rounds)."""
    for _ in range(50):
        if not any([await one.step() for one in followers]):
            return
    pytest.fail("the followers never caught up")


@pytest.fixture
def usage() -> MemoryUsageStore:
    return MemoryUsageStore(clock=lambda: NOW)


async def test_every_record_reaches_the_target_once_in_effect(
    receiver: Receiver, usage: MemoryUsageStore
) -> None:
    clock = Clock()
    records = [record(tenant) for tenant in ("acme", "globex") for _ in range(130)]
    await usage.record(records)
    one = follower(receiver, usage, MemorySinkStateStore(clock=clock), clock)
    await drain(one)
    assert receiver.problems == []
    assert len(receiver.held) == 260
    assert one.outcomes["delivered"] == 260
    assert one.behind_records == 0
    assert not await one.step()  # nothing is sent twice
    assert len(receiver.held) == 260
    assert set(receiver.arrivals.values()) == {1}


def held_ids(receiver: Receiver) -> set[str]:
    """The request ids the target counts (OpenMeter keys its events by source and id)."""
    return {key.rpartition("/")[2] for key in receiver.held}


async def test_503s_a_429_with_retry_after_and_a_timeout_delay_nothing_and_lose_nothing(
    receiver: Receiver, usage: MemoryUsageStore
) -> None:
    clock = Clock()
    records = [record() for _ in range(150)]
    await usage.record(records)
    receiver.script.extend(
        [
            Scripted(status=503),
            Scripted(status=503, hold=True),  # took them, and the answer was a 503
            Scripted(status=429, retry_after="7"),
            Scripted(hang=2.5),  # no answer within the client's timeout (it held them)
        ]
    )
    one = follower(receiver, usage, MemorySinkStateStore(clock=clock), clock, timeout=1.0)
    await drain(one)
    await idle(receiver)
    assert receiver.problems == []
    assert held_ids(receiver) == {r.request_id for r in records}
    assert one.outcomes["retried"] > 0
    assert one.outcomes["quarantined"] == 0
    # The backoff was slept on the test's clock, Retry-After's 7 s among the waits.
    assert 7 in [round(seconds) for seconds in clock.slept]
    assert all(0 <= seconds <= 60 for seconds in clock.slept)


async def test_a_record_the_target_refuses_is_quarantined_and_the_rest_go_through(
    receiver: Receiver, usage: MemoryUsageStore
) -> None:
    clock = Clock()
    state = MemorySinkStateStore(clock=clock)
    records = [record() for _ in range(40)]
    await usage.record(records)
    bad = records[17].request_id
    receiver.refuse.add(f"meshtoll/{bad}" if receiver.target == "openmeter" else bad)
    one = follower(receiver, usage, state, clock)
    await drain(one)
    assert held_ids(receiver) == {r.request_id for r in records} - {bad}
    (quarantined,) = await state.quarantined(receiver.target)
    assert quarantined.record.request_id == bad
    assert quarantined.refusal.reason == "refused"
    assert quarantined.refusal.status in (400, 422)
    assert quarantined.refusal.answer  # the target's own words
    # Fixed on the target's side, replayed by hand: delivered, and out of the quarantine.
    receiver.refuse.clear()
    assert await state.replay(receiver.target, [quarantined.key]) == 1
    await drain(one)
    assert held_ids(receiver) == {r.request_id for r in records}
    assert await state.quarantined(receiver.target) == []
    assert await state.replays(receiver.target, 10) == []


async def test_records_billed_late_by_reconciliation_are_delivered_after_the_cursor_passed_their_time(
    receiver: Receiver, usage: MemoryUsageStore
) -> None:
    clock = Clock()
    one = follower(receiver, usage, MemorySinkStateStore(clock=clock), clock)
    await usage.record([record(at=NOW - 10), record(at=NOW - 5)])
    await drain(one)
    # An admission whose access-log record never came, billed now with its own, older time.
    late = record(at=NOW - 40, status=0, source="admission")
    await usage.record([late])
    await drain(one)
    assert late.request_id in held_ids(receiver)
    assert len(receiver.held) == 3


async def test_two_followers_take_turns_by_the_lease_and_never_send_a_record_twice(
    receiver: Receiver, usage: MemoryUsageStore
) -> None:
    clock = Clock()
    state = MemorySinkStateStore(clock=clock)
    first = follower(receiver, usage, state, clock, owner="first")
    second = follower(receiver, usage, state, clock, owner="second")
    await usage.record([record() for _ in range(120)])
    await drain(first, second)
    assert first.outcomes["delivered"] == 120
    assert second.outcomes["delivered"] == 0
    # The first stops (its lease runs out); the second resumes at the first's cursors.
    clock.now += 60
    await usage.record([record() for _ in range(30)])
    await drain(second)
    assert second.outcomes["delivered"] == 30
    assert len(receiver.held) == 150
    assert set(receiver.arrivals.values()) == {1}


@pytest.fixture
def stripe() -> Iterator[Receiver]:
    with running_receiver("stripe") as found:
        yield found


async def test_stripe_renews_an_expired_session_and_delivers_through_it(
    stripe: Receiver, usage: MemoryUsageStore
) -> None:
    clock = Clock()
    await usage.record([record() for _ in range(250)])
    stripe.script.extend([Scripted(), Scripted(), Scripted(expire_session=True)])
    one = follower(stripe, usage, MemorySinkStateStore(clock=clock), clock)
    await drain(one)
    assert stripe.problems == []
    assert len(stripe.held) == 250
    assert stripe.requests["/v2/billing/meter_event_session"] == 2  # the first, and one on expiry
    assert one.outcomes["retried"] == 0  # a renewed session is not a failure


async def test_stripe_sessions_are_renewed_before_they_expire(
    stripe: Receiver, usage: MemoryUsageStore
) -> None:
    clock = Clock()
    one = follower(stripe, usage, MemorySinkStateStore(clock=clock), clock)
    await usage.record([record()])
    await drain(one)
    # Fourteen and a half minutes on (the token lives fifteen): a new session, not a 401.
    sink_clock = one.sink._clock  # type: ignore[attr-defined]
    one.sink._clock = lambda: sink_clock() + 14.5 * 60  # type: ignore[attr-defined]
    await usage.record([record()])
    await drain(one)
    assert stripe.requests["/v2/billing/meter_event_session"] == 2
    assert stripe.requests["/v2/billing/meter_event_stream"] == 2
    assert len(stripe.held) == 2


async def test_stripe_quarantines_records_older_than_its_35_days_with_the_reason(
    stripe: Receiver, usage: MemoryUsageStore
) -> None:
    clock = Clock()
    state = MemorySinkStateStore(clock=clock)
    old, fresh = record(at=NOW - 36 * 86400), record()
    await usage.record([old, fresh])
    await drain(follower(stripe, usage, state, clock))
    assert set(stripe.held) == {fresh.request_id}
    (quarantined,) = await state.quarantined("stripe")
    assert (quarantined.record.request_id, quarantined.refusal.reason) == (old.request_id, TOO_OLD)
    assert "35 days" in quarantined.refusal.answer


async def test_stripe_v1_sends_one_form_a_call_and_takes_a_known_identifier_as_delivered(
    stripe: Receiver, usage: MemoryUsageStore
) -> None:
    clock = Clock()
    environ = {"MESHTOLL_STRIPE_API_KEY": stripe.token}
    sink = opened(
        open_sink("stripe", stripe.url, DefaultNames, environ, cloudevents_source="", stripe_api="v1")
    )
    records = [record() for _ in range(5)]
    await usage.record(records)
    stripe.script.append(Scripted(status=500, hold=True))  # the first one taken, its answer lost
    one = LedgerFollower(
        sink,
        usage,
        MemorySinkStateStore(clock=clock),
        owner="v1",
        start=0.0,
        clock=clock,
        sleep=clock.sleep,
        random=random.random,
    )
    await drain(one)
    assert stripe.problems == []
    assert set(stripe.held) == {r.request_id for r in records}
    assert stripe.requests["/v1/billing/meter_events"] == 6  # five, and the one sent again
    assert one.outcomes["quarantined"] == 0


async def sent_then_died(
    stripe: Receiver, usage: MemoryUsageStore, state: SinkStateStore, clock: Clock
) -> set[str]:
    """A follower sends a batch that Stripe holds, and dies before it hears back: the ids."""
    records = [record() for _ in range(3)]
    await usage.record(records)
    stripe.script.extend([Scripted(), Scripted(hang=2.5)])  # a session; a batch held, its answer lost
    dying = follower(stripe, usage, state, clock, owner="dying", timeout=1.0)

    async def die(seconds: float) -> None:
        raise RuntimeError("the process died while waiting to retry")

    dying._attempts = replace(dying._attempts, wait=die)
    with pytest.raises(RuntimeError):
        await dying.step()
    return {r.request_id for r in records}


async def test_a_batch_whose_answer_was_lost_is_not_sent_again_once_the_target_forgot_its_ids(
    stripe: Receiver, usage: MemoryUsageStore
) -> None:
    # The next follower starts about a day later: Stripe may no longer know those
    # identifiers, and sending them again could bill them twice.
    clock = Clock()
    state = MemorySinkStateStore(clock=clock)
    sent = await sent_then_died(stripe, usage, state, clock)
    clock.now += 23.5 * 3600  # past Stripe's 24 hours less an hour's margin for clocks
    await drain(follower(stripe, usage, state, clock, owner="next"))
    await idle(stripe)
    assert set(stripe.arrivals.values()) == {1}  # none sent a second time
    quarantined = await state.quarantined("stripe")
    assert {item.record.request_id for item in quarantined} == sent
    assert {item.refusal.reason for item in quarantined} == {UNCONFIRMED}


async def test_a_batch_whose_answer_was_lost_is_sent_again_while_the_target_still_knows_its_ids(
    stripe: Receiver, usage: MemoryUsageStore
) -> None:
    clock = Clock()
    state = MemorySinkStateStore(clock=clock)
    sent = await sent_then_died(stripe, usage, state, clock)
    clock.now += 3600  # an hour: within Stripe's 24
    await drain(follower(stripe, usage, state, clock, owner="next"))
    await idle(stripe)
    assert set(stripe.held) == sent
    assert await state.quarantined("stripe") == []


async def test_a_tenants_month_of_usage_reaches_the_target_through_every_scripted_failure(
    receiver: Receiver, usage: MemoryUsageStore
) -> None:
    # A month of a tenant's requests, a batch every quarter hour, written as the meter writes
    # them; some billed late by reconciliation, after later ones.
    clock = Clock()
    month = [record(at=NOW - 30 * 86400 + quarter * 900 + n) for quarter in range(30 * 96) for n in range(2)]
    for start in range(0, len(month), 50):
        await usage.record(month[start : start + 50])
    late = [record(at=NOW - 20 * 86400 + n, status=0, source="admission") for n in range(5)]
    await usage.record(late)
    failures = [
        Scripted(status=503),
        Scripted(status=503, hold=True),  # Lago: its 422 for the known ids next
        Scripted(status=429, retry_after="3"),
        Scripted(hang=2.5),
        Scripted(expire_session=True),
    ]
    receiver.script.extend([Scripted(), *failures])
    one = follower(receiver, usage, MemorySinkStateStore(clock=clock), clock, timeout=1.0)
    await drain(one)
    await idle(receiver)
    assert receiver.problems == []
    assert sorted(held_ids(receiver)) == sorted(r.request_id for r in [*month, *late])
    assert one.outcomes["quarantined"] == 0
    assert one.behind_records == 0


@pytest.mark.integration
async def test_a_ledger_that_expired_and_began_again_is_followed_from_its_new_start(
    redis_url: str, receiver: Receiver
) -> None:
    # A tenant idle for the whole retention: its ledger and its count expire together, and
    # the next records are numbered from 1 again, below the number the cursor stands at.
    clock = Clock()
    tenant = f"expired-{next(_ids)}"
    usage = RedisUsageStore(redis_url)
    try:
        one = follower(receiver, usage, MemorySinkStateStore(clock=clock), clock)
        await usage.record([record(tenant) for _ in range(5)])
        await drain(one)
        client = redis.asyncio.Redis.from_url(redis_url)
        await client.delete(ledger_key(tenant), ledger_appended_key(tenant))
        await client.aclose()
        again = [record(tenant) for _ in range(2)]
        await usage.record(again)
        await drain(one)
        assert {r.request_id for r in again} <= held_ids(receiver)
        assert one.behind_records == 0
    finally:
        await usage.close()
