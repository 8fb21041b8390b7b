"""`meshtoll usage push`: a window of the ledger delivered once by hand, through the sinks'
adapters, retries and quarantine; never what the sink or an earlier push delivered, so that
pushing a window again sends only the records billed late; refused while a sink runs."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import replace

import pytest

from meshtoll.cli import main
from meshtoll.errors import DeliveryStalled
from meshtoll.meter.deliver import Attempts
from meshtoll.meter.push import Window, push
from meshtoll.sinks.names import DefaultNames
from meshtoll.storage import MemorySinkStateStore, MemoryUsageStore
from meshtoll.storage.usage_redis import RedisUsageStore
from meshtoll.targets import open_sink
from meshtoll.usage.records import UsageRecord
from tests.billing_receivers import Receiver, Scripted, running_receiver

NOW = 1_796_000_000.0
DAY = 86400.0
_ids = itertools.count()


def record(at: float, tenant: str = "acme", **fields: object) -> UsageRecord:
    found = UsageRecord(f"push-{next(_ids)}", at, tenant, "ci", "pro", "search", "GET", 200, 1, 2, 0.5, 3)
    return replace(found, **fields)  # type: ignore[arg-type]


@pytest.fixture
def lago() -> Iterator[Receiver]:
    with running_receiver("lago") as found:
        yield found


async def no_wait(seconds: float) -> None:
    return None


async def pushed(
    receiver: Receiver, usage: MemoryUsageStore, state: MemorySinkStateStore, window: Window
) -> dict[str, int]:
    sink = open_sink(
        "lago", receiver.url, DefaultNames, {"MESHTOLL_LAGO_API_KEY": receiver.token}, cloudevents_source=""
    )
    try:
        outcomes = await push(sink, usage, state, window, Attempts(no_wait, random.random, limit=4), NOW)
    finally:
        await sink.close()
    return dict(outcomes)


async def test_a_window_is_pushed_once_and_pushed_again_sends_only_what_was_billed_late(
    lago: Receiver,
) -> None:
    usage, state = MemoryUsageStore(clock=lambda: NOW), MemorySinkStateStore()
    inside = [record(NOW - DAY + n) for n in range(150)]
    await usage.record([record(NOW - 3 * DAY), *inside, record(NOW + 10)])
    window = Window(NOW - 2 * DAY, NOW, ["acme"])
    assert (await pushed(lago, usage, state, window))["delivered"] == 150
    assert set(lago.held) == {r.request_id for r in inside}
    # Again: nothing new to send (Lago would refuse it anyway; Stripe would not know).
    again = await pushed(lago, usage, state, window)
    assert (again.get("delivered", 0), again["skipped"]) == (0, 150)
    # An admission billed late by reconciliation, with a time inside the window.
    late = record(NOW - DAY + 500, status=0, source="admission")
    await usage.record([late])
    third = await pushed(lago, usage, state, window)
    assert (third["delivered"], third["skipped"]) == (1, 150)
    assert late.request_id in lago.held
    assert set(lago.arrivals.values()) == {1}


async def test_a_push_refuses_while_a_sink_holds_the_lease(lago: Receiver) -> None:
    usage, state = MemoryUsageStore(clock=lambda: NOW), MemorySinkStateStore()
    await usage.record([record(NOW - 10)])
    assert await state.lease("lago", "the running sink", 30)
    with pytest.raises(DeliveryStalled, match="a lago sink is running"):
        await pushed(lago, usage, state, Window(NOW - DAY, NOW, ["acme"]))
    assert lago.held == {}


async def test_a_target_that_keeps_failing_stops_the_push_and_the_next_one_resumes(lago: Receiver) -> None:
    usage, state = MemoryUsageStore(clock=lambda: NOW), MemorySinkStateStore()
    records = [record(NOW - 1000 + n) for n in range(250)]
    await usage.record(records)
    window = Window(NOW - DAY, NOW, ["acme"])
    lago.script.extend(
        [Scripted(), Scripted(status=503), Scripted(status=503), Scripted(status=503), Scripted(status=503)]
    )
    with pytest.raises(DeliveryStalled, match="still failing after 4 attempts"):
        await pushed(lago, usage, state, window)
    assert len(lago.held) == 100  # the first batch went through, and is recorded
    resumed = await pushed(lago, usage, state, window)
    assert (resumed["delivered"], resumed["skipped"]) == (150, 100)
    assert set(lago.held) == {r.request_id for r in records}


@pytest.mark.integration
def test_usage_push_and_the_quarantine_commands_on_the_shared_store(
    lago: Receiver, redis_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    tenant = f"push-cli-{next(_ids)}"
    records = [record(NOW - 50 + n, tenant=tenant) for n in range(5)]

    async def store() -> None:
        usage = RedisUsageStore(redis_url, clock=lambda: NOW)
        await usage.record(records)
        await usage.close()

    asyncio.run(store())
    lago.refuse.add(records[2].request_id)
    monkeypatch.setenv("MESHTOLL_LAGO_API_KEY", lago.token)
    since, until = "2026-11-28", "2026-12-01"
    arguments = ["usage", "push", "--to", "lago", "--url", lago.url, "--since", since, "--until", until]
    assert main([*arguments, "--tenant", tenant, "--redis-url", redis_url]) == 0
    assert (
        capsys.readouterr().out.strip()
        == "lago: 4 delivered, 0 delivered or quarantined before, 1 quarantined, 0 sent again after a failure"
    )
    assert (
        main(["usage", "quarantine", "list", "--sink", "lago", "--redis-url", redis_url, "--format", "json"])
        == 0
    )
    listed = [item for item in json.loads(capsys.readouterr().out)["records"] if item["tenant"] == tenant]
    assert [(item["request_id"], item["reason"], item["status"]) for item in listed] == [
        (records[2].request_id, "refused", 422)
    ]
    assert "subscription_not_found" in listed[0]["answer"]
    lago.refuse.clear()
    key = listed[0]["key"]
    assert (
        main(["usage", "quarantine", "replay", "--sink", "lago", "--key", key, "--redis-url", redis_url]) == 0
    )
    assert capsys.readouterr().out.strip() == "1 record(s) queued for lago again"
    # The next push delivers the replayed record first, and nothing else again.
    assert main([*arguments, "--tenant", tenant, "--redis-url", redis_url]) == 0
    assert (
        capsys.readouterr().out.strip()
        == "lago: 1 delivered, 5 delivered or quarantined before, 0 quarantined, 0 sent again after a failure"
    )
    assert set(lago.held) == {r.request_id for r in records}
