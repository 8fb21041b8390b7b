"""A billing sink that follows the usage ledger (`meshtoll serve --usage-sink`): records go
to the target in append order, each tenant's cursor moving only once its records are
settled, under a lease so that one instance delivers at a time and a restart resumes.

Each round: replayed records first, then every tenant whose ledger has grown past its
cursor (one round trip tells), a page of its entries, in batches the target takes. Before
a batch goes out its cursor notes what is in flight and since when; after, the cursor moves
past it and refused records go to the quarantine, in one write guarded by the lease. A
batch whose answer was lost (a crash, a lost lease) is sent again on resume, which the
target recognises by id, unless the target has forgotten the ids by then: those records
are quarantined as unconfirmed instead of risking a second count.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from meshtoll.errors import LeaseLost, StorageError
from meshtoll.meter.deliver import Attempts, deliver_replays, quarantined, renew, settle, waiting_with_lease
from meshtoll.sinks.backoff import DEFAULT_BACKOFF, Backoff
from meshtoll.sinks.delivery import UNCONFIRMED, Refusal, Sink
from meshtoll.sinks.state import (
    LEASE_SECONDS,
    WHOLE_ENTRY,
    Cursor,
    Place,
    PushedWindow,
    Quarantined,
    SinkStateStore,
    place_key,
)
from meshtoll.usage.ledger import LedgerEntry, position_before, position_preceding, position_time
from meshtoll.usage.records import UsageRecord
from meshtoll.usage.store import UsageStore

log = logging.getLogger("meshtoll.sinks")

IDLE_SECONDS = 1.0  # between rounds that found nothing to deliver
PAGE_ENTRIES = 8  # ledger entries read per tenant and round (at most 2,000 records)
ROUND_RECORDS = 2000  # records one round holds in memory at most
# A batch is not sent again once it was first sent this long before the target forgets ids:
# clocks differ, and "24 hours" is the target's promise, not an instant to cut close.
DEDUP_MARGIN_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Waiting:
    """A record after its tenant's cursor, where it sits in the ledger."""

    record: UsageRecord
    place: Place
    number: int | None


class LedgerFollower:
    def __init__(
        self,
        sink: Sink,
        usage: UsageStore,
        state: SinkStateStore,
        *,
        owner: str,
        start: float,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        random: Callable[[], float],
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        """`start`: a tenant the sink has never delivered for starts with what its ledger
        was appended from then on."""
        self.sink = sink
        self.name = sink.target
        self._usage = usage
        self._state = state
        self._owner = owner
        self._start = start
        self._clock = clock
        self._sleep = sleep
        self._attempts = Attempts(waiting_with_lease(state, self.name, owner, sleep), random, backoff)
        self._cursors: dict[str, Cursor] | None = None  # None: not holding the lease
        self._pushed: list[PushedWindow] = []
        # Each outcome from zero, so that /metrics shows the series before the first record
        # and an alert on its increase starts from a known count.
        self.outcomes: Counter[str] = Counter(
            dict.fromkeys(("delivered", "retried", "quarantined", "skipped"), 0)
        )
        self.behind_records = 0
        self.behind_seconds = 0.0

    @property
    def delivering(self) -> bool:
        """Whether this follower holds the sink's lease."""
        return self._cursors is not None

    async def run_forever(self) -> None:
        try:
            while True:
                moved = False
                try:
                    moved = await self.step()
                except LeaseLost:
                    log.warning("%s sink: lost its lease; another instance delivers now", self.name)
                    self._cursors = None
                except StorageError as exc:
                    log.warning("%s sink: the store did not answer (%s); trying again", self.name, exc)
                if not moved:
                    await self._sleep(IDLE_SECONDS)
        finally:
            await self._give_up_lease()

    async def _give_up_lease(self) -> None:
        """On the way out: another instance may take over at once instead of after the
        lease runs out (which it still does, should the store not answer now)."""
        if self._cursors is None:
            return
        try:
            await self._state.unlease(self.name, self._owner)
        except StorageError as exc:
            log.warning("%s sink: could not give up its lease (%s); it expires by itself", self.name, exc)

    async def step(self) -> bool:
        """One round; whether it moved anything (else the loop rests a second)."""
        if not await self._state.lease(self.name, self._owner, LEASE_SECONDS):
            if self._cursors is not None:
                raise LeaseLost(self.name)
            return False
        if self._cursors is None:
            self._cursors = await self._state.cursors(self.name)
            self._pushed = await self._state.pushed(self.name)
            log.info("%s sink: delivering (lease taken, %d tenants' cursors)", self.name, len(self._cursors))
        if await deliver_replays(
            self.sink, self._state, self._owner, self._attempts, self.outcomes, self._clock()
        ):
            return True
        waiting = await self._waiting()
        for start in range(0, len(waiting), self.sink.max_batch):
            await self._deliver(waiting[start : start + self.sink.max_batch])
        return bool(waiting)

    def _cursor(self, tenant: str) -> Cursor:
        assert self._cursors is not None
        found = self._cursors.get(tenant)
        return Cursor((position_before(self._start), WHOLE_ENTRY)) if found is None else found

    async def _waiting(self) -> list[Waiting]:
        """The records after each tenant's cursor, a page per tenant, oldest tenants' first,
        at most ROUND_RECORDS; the lag gauges as of them."""
        tenants = await self._usage.tenants()
        appended = await self._usage.ledger_appended(tenants)
        behind = {tenant: self._behind(tenant, count) for tenant, count in appended.items()}
        self.behind_records = sum(behind.values())
        oldest = math.inf
        waiting: list[Waiting] = []
        for tenant in sorted((t for t in tenants if behind[t] > 0), key=lambda t: -behind[t]):
            if len(waiting) >= ROUND_RECORDS:
                break
            cursor = self._cursor(tenant)
            entries = await self._usage.ledger_after(tenant, position_preceding(cursor.last[0]), PAGE_ENTRIES)
            found = list(_after(cursor, entries))
            if not found:  # nothing after the cursor: it stands at what was appended
                assert self._cursors is not None
                self._cursors[tenant] = replace(cursor, number=appended[tenant])
                continue
            oldest = min(oldest, position_time(found[0].place[0]))
            waiting += found
        self.behind_seconds = 0.0 if math.isinf(oldest) else max(0.0, self._clock() - oldest)
        return waiting

    def _behind(self, tenant: str, appended: int) -> int:
        """How many of the tenant's records the sink has not passed yet. Fewer appended than
        passed: the ledger expired (nothing written for the whole retention) and began
        again from 1, its new entries all after the cursor's position."""
        number = self._cursor(tenant).number or 0
        return appended - number if appended >= number else appended

    async def _deliver(self, batch: list[Waiting]) -> None:
        now = self._clock()
        # Records a push delivered by hand are passed, not sent again.
        outgoing = [
            item for item in batch if not any(w.covers(item.record, item.place) for w in self._pushed)
        ]
        self.outcomes["skipped"] += len(batch) - len(outgoing)
        held_back = {index: r for index, item in enumerate(outgoing) if (r := self._refusal(item, now))}
        refused = dict(held_back)
        ends = _ends(batch)
        if len(held_back) < len(outgoing):
            # A fresh lease for each batch: one call (at most a third of it) fits inside.
            await renew(self._state, self.name, self._owner)
            await self._save({tenant: self._sending(tenant, end.place, now) for tenant, end in ends.items()})
            records = [item.record for item in outgoing]
            refused = await settle(self.sink, records, self._attempts, self.outcomes, held_back)
        found = [(outgoing[index].record, refusal) for index, refusal in refused.items()]
        quarantine = quarantined(self.sink, found, self._clock(), self.outcomes)
        await self._save({tenant: self._passed(tenant, end) for tenant, end in ends.items()}, quarantine)

    def _pushed_before(self, item: Waiting) -> bool:
        return any(window.covers(item.record, item.place) for window in self._pushed)

    def _sending(self, tenant: str, through: Place, now: float) -> Cursor:
        """The tenant's cursor noting the batch in flight, first sent now or at the attempt
        of it that went before (a resend after a crash keeps the first time)."""
        cursor = self._cursor(tenant)
        return replace(cursor, sending=through, sent_at=cursor.sent_at or now)

    def _passed(self, tenant: str, end: Waiting) -> Cursor:
        return Cursor(end.place, end.number or self._cursor(tenant).number)

    def _refusal(self, item: Waiting, now: float) -> Refusal | None:
        cursor = self._cursor(item.record.tenant)
        dedup = self.sink.dedup_seconds
        if (
            dedup is not None
            and cursor.sending is not None
            and cursor.sent_at is not None
            and now - cursor.sent_at > dedup - DEDUP_MARGIN_SECONDS
            and place_key(item.place) <= place_key(cursor.sending)
        ):
            answer = (
                f"sent at {cursor.sent_at:.0f} (Unix seconds) without an answer; {self.name} forgets ids "
                f"after {dedup / 3600:g} h, so sending it again could count it twice: check {self.name} "
                "and replay it if it is not there"
            )
            return Refusal(UNCONFIRMED, answer)
        return self.sink.refusal_before_sending(item.record, now)

    async def _save(
        self,
        cursors: dict[str, Cursor],
        quarantine: Sequence[Quarantined] = (),
        settled: Sequence[str] = (),
    ) -> None:
        if not await self._state.save(self.name, self._owner, cursors, quarantine, settled):
            raise LeaseLost(self.name)
        assert self._cursors is not None
        self._cursors.update(cursors)


def _after(cursor: Cursor, entries: Sequence[LedgerEntry]) -> list[Waiting]:
    return [
        Waiting(record, (entry.position, index), entry.number_of(index))
        for entry in entries
        for index, record in enumerate(entry.records)
        if not cursor.passed((entry.position, index))
    ]


def _ends(batch: Sequence[Waiting]) -> dict[str, Waiting]:
    """Each tenant's last record in the batch: where its cursor goes once it is settled."""
    return {item.record.tenant: item for item in batch}
