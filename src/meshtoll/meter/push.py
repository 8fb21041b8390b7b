"""`meshtoll usage push`: one delivery of the ledger's records of a window to a target, by
hand, through the same adapters, retries and quarantine as the sink that follows the
ledger, and holding the same lease: with a sink running for the target, the push refuses
(the sink delivers everything anyway).

A push never sends what was delivered already: records the sink's cursors have passed, and
records earlier pushes delivered (each push records its window and how far it went in each
tenant's ledger, after every batch). Pushing a window again sends only what the ledger has
gained in it since: records billed late. Nothing leans on the target remembering ids,
which Stripe and OpenMeter do for 24 hours only.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

from meshtoll.errors import DeliveryStalled
from meshtoll.meter.deliver import Attempts, deliver_replays, quarantined, renew, settle, waiting_with_lease
from meshtoll.meter.follower import PAGE_ENTRIES
from meshtoll.sinks.delivery import Sink
from meshtoll.sinks.state import LEASE_SECONDS, Cursor, Place, PushedWindow, SinkStateStore
from meshtoll.usage.ledger import position_before
from meshtoll.usage.records import UsageRecord
from meshtoll.usage.store import UsageStore

log = logging.getLogger("meshtoll.sinks")


@dataclass(frozen=True, slots=True)
class Window:
    since: float
    until: float
    tenants: Sequence[str]


async def push(
    sink: Sink, usage: UsageStore, state: SinkStateStore, window: Window, attempts: Attempts, now: float
) -> Counter[str]:
    """Deliver the window's records; the counts by outcome (delivered, quarantined, skipped,
    retried). Raises DeliveryStalled when another instance holds the lease or the target
    keeps failing (what was delivered stays recorded: pushing again resumes)."""
    owner = f"push-{uuid.uuid4().hex}"
    if not await state.lease(sink.target, owner, LEASE_SECONDS):
        raise DeliveryStalled(
            f"a {sink.target} sink is running (it holds the lease): it delivers the ledger itself"
        )
    outcomes: Counter[str] = Counter()
    try:
        while await deliver_replays(sink, state, owner, attempts, outcomes, now):
            pass  # records replayed from the quarantine go first
        cursors = await state.cursors(sink.target)
        earlier = await state.pushed(sink.target)
        mine = PushedWindow(window.since, window.until)
        # Retries wait keeping the lease, and each batch starts with a fresh one.
        attempts = replace(attempts, wait=waiting_with_lease(state, sink.target, owner, attempts.wait))
        for tenant in window.tenants:
            unsent = _unsent(usage, tenant, window, cursors.get(tenant), earlier, outcomes, sink.max_batch)
            async for batch in unsent:
                await renew(state, sink.target, owner)
                await _deliver(sink, state, owner, batch, attempts, outcomes, now)
                mine.through[tenant] = batch[-1][1]
                if not await state.save_pushed(sink.target, owner, [*earlier, mine]):
                    raise DeliveryStalled(f"the {sink.target} sink's lease was lost; push again to resume")
    finally:
        await state.unlease(sink.target, owner)
    return outcomes


async def _unsent(
    usage: UsageStore,
    tenant: str,
    window: Window,
    cursor: Cursor | None,
    earlier: Sequence[PushedWindow],
    outcomes: Counter[str],
    batch_size: int,
) -> AsyncIterator[list[tuple[UsageRecord, Place]]]:
    """The tenant's records of the window not delivered before, in ledger order, in
    batches. A record of the window was appended at its time or later: reading starts there."""
    after = position_before(window.since)
    batch: list[tuple[UsageRecord, Place]] = []
    while entries := await usage.ledger_after(tenant, after, PAGE_ENTRIES):
        for entry in entries:
            for index, record in enumerate(entry.records):
                place = (entry.position, index)
                if not window.since <= record.time < window.until:
                    continue
                if (cursor is not None and cursor.passed(place)) or any(
                    pushed.covers(record, place) for pushed in earlier
                ):
                    outcomes["skipped"] += 1
                    continue
                batch.append((record, place))
                if len(batch) == batch_size:
                    yield batch
                    batch = []
        after = entries[-1].position
    if batch:
        yield batch


async def _deliver(
    sink: Sink,
    state: SinkStateStore,
    owner: str,
    batch: list[tuple[UsageRecord, Place]],
    attempts: Attempts,
    outcomes: Counter[str],
    now: float,
) -> None:
    records = [record for record, _ in batch]
    early = {
        index: refusal
        for index, record in enumerate(records)
        if (refusal := sink.refusal_before_sending(record, now))
    }
    refused = await settle(sink, records, attempts, outcomes, early)
    quarantine = quarantined(
        sink, [(records[index], refusal) for index, refusal in refused.items()], now, outcomes
    )
    if quarantine and not await state.save(sink.target, owner, {}, quarantine):
        raise DeliveryStalled(f"the {sink.target} sink's lease was lost; push again to resume")
