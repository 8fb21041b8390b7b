"""Access-log observations settle the admissions authz recorded; nothing else bills.

Anything that reaches the meter's port can send access-log entries, so an entry decides
nothing: it is billed only when authz admitted a request of the same tenant and request id,
and then with authz's identity and route, the units ext_proc reported, and the entry's own
status, sizes and timing. An entry can arrive before its admission (both are flushed in
batches, from different places), or before the units of a body-metered request: it waits,
for a bounded time and in bounded numbers. What never matches (forged, replayed after
settlement, or an admission lost with a crashed process) is dropped and counted; its
admission, if it ever comes, is billed by reconciliation.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable, Sequence

from meshtoll.errors import StorageError
from meshtoll.usage.records import Observation, UsageRecord
from meshtoll.usage.store import UsageStore
from meshtoll.wire import is_billable_status

log = logging.getLogger("meshtoll.meter")

# Admissions and reported units reach the store within AdmissionRecorder's flush interval
# (0.5 s) of the request; an entry waits up to ten times that for them.
WAIT_SECONDS = 5.0
RETRY_SECONDS = 0.5
# Entries held while they wait: at 20,000 metered requests a second, a few seconds' worth.
# Beyond that an entry is dropped at once (its admission is still billed by reconciliation).
MAX_WAITING = 200_000


class Settlement:
    def __init__(
        self,
        store: UsageStore,
        *,
        clock: Callable[[], float],
        wait_seconds: float = WAIT_SECONDS,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self._store = store
        self._clock = clock
        self._wait = wait_seconds
        self._max_waiting = max_waiting
        self._waiting: deque[tuple[float, Observation]] = deque()  # (give up at, entry)
        # billed, replayed (settled before), unmatched (no admission in time), waited,
        # overflow (dropped unseen: too many waiting), unavailable (the store did not answer),
        # anonymous (no tenant: a request authz refused; counted by the access-log adapter)
        self.outcomes: Counter[str] = Counter()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def settle(self, observations: Sequence[Observation]) -> None:
        give_up_at = self._clock() + self._wait
        await self._settle([(give_up_at, seen) for seen in observations])

    async def retry_waiting(self) -> None:
        """Try again every entry that waits for its admission or its units."""
        if self._waiting:
            batch = list(self._waiting)
            self._waiting.clear()
            await self._settle(batch)

    async def retry_forever(self) -> None:
        while True:
            await asyncio.sleep(RETRY_SECONDS)
            await self.retry_waiting()

    async def _settle(self, batch: list[tuple[float, Observation]]) -> None:
        try:
            found = await self._store.pending([(seen.tenant, seen.request_id) for _, seen in batch])
        except StorageError as exc:
            # The wait starts again: an outage must not turn genuine entries into unmatched
            # ones before the admissions buffered meanwhile can reach the store.
            give_up_at = self._clock() + self._wait
            self._wait_more([(give_up_at, seen) for _, seen in batch])
            self.outcomes["unavailable"] += 1
            log.warning("access-log entries wait: the usage store did not answer: %s", exc)
            return
        now = self._clock()
        records: list[UsageRecord] = []
        still_waiting: list[tuple[float, Observation]] = []
        for give_up_at, seen in batch:
            pending = found.get((seen.tenant, seen.request_id))
            if pending is None:
                if now < give_up_at:
                    still_waiting.append((give_up_at, seen))
                else:
                    self.outcomes["unmatched"] += 1
                continue
            admission, reported = pending
            if (
                reported is None
                and admission.awaits_report
                and is_billable_status(seen.status)
                and now < give_up_at
            ):
                still_waiting.append((give_up_at, seen))
                continue
            records.append(admission.settled_by(seen, reported))
        self._wait_more(still_waiting)
        if records:
            await self._record(records)

    async def _record(self, records: list[UsageRecord]) -> None:
        try:
            counted = await self._store.record(records)
        except StorageError as exc:
            # Their admissions stay pending: reconciliation bills them.
            self.outcomes["unavailable"] += 1
            log.error("usage batch of %d records not stored: %s", len(records), exc)
            return
        self.outcomes["billed"] += counted
        self.outcomes["replayed"] += len(records) - counted

    def _wait_more(self, batch: list[tuple[float, Observation]]) -> None:
        room = self._max_waiting - len(self._waiting)
        if len(batch) > room:
            self.outcomes["overflow"] += len(batch) - max(0, room)
            batch = batch[: max(0, room)]
        self.outcomes["waited"] += len(batch)
        self._waiting.extend(batch)
