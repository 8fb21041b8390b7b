"""Access-log observations settle the admissions authz recorded; nothing else bills.

Anything that reaches the meter's port can send access-log entries, so an entry decides
nothing: it is billed only when authz admitted a request of the same tenant and request id,
and then with authz's identity and route, the units ext_proc reported, and the entry's own
status, sizes and timing. An entry can arrive before its admission (both are flushed in
batches, from different places), or before the units of a body-metered request: it waits,
for a bounded time and in bounded numbers. What never matches (forged, replayed after
settlement, or an admission lost with a crashed process) is dropped and counted; its
admission, if it ever comes, is billed by reconciliation.

An entry that names no tenant is of a request authz refused, or of one it admitted whose
allow never reached Envoy in time (Envoy's ext_authz timeout, or meshtoll stopping): Envoy
answered that one itself (ext_authz's status_on_error, 503) and forwarded nothing. The
access-log adapters hand over such entries only when Envoy failed the request itself
(wire.is_envoys_own_failure: a flood of refusals costs no lookup). One settles the
admission of its request id whatever the tenant (the store's index finds it, one lookup
per batch), with its status: 0 units, where reconciliation would have billed it in full.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from time import perf_counter

from meshtoll.errors import StorageError
from meshtoll.telemetry.histogram import Histogram
from meshtoll.telemetry.tracing import Tracing, end_span
from meshtoll.usage.recorder import AdmissionRecorder
from meshtoll.usage.records import Admission, Observation, UsageRecord
from meshtoll.usage.store import UsageStore
from meshtoll.wire import is_billable_status

log = logging.getLogger("meshtoll.meter")

# Admissions and reported units reach the store within two of AdmissionRecorder's flush
# intervals (1 s) of the request; an entry waits up to five times that for them.
WAIT_SECONDS = 5.0
RETRY_SECONDS = 0.5
# Entries held while they wait: at 20,000 metered requests a second, a few seconds' worth.
# Beyond that an entry is dropped at once (its admission is still billed by reconciliation).
MAX_WAITING = 200_000


# Entries are Observation tuples (usage/records.py): seen[0] the request id, seen[1] the
# tenant ("" when the entry names none), seen[2] the status.


class Settlement:
    def __init__(
        self,
        store: UsageStore,
        *,
        clock: Callable[[], float],
        wait_seconds: float = WAIT_SECONDS,
        max_waiting: int = MAX_WAITING,
        latency: Histogram | None = None,
        ledger_writes: Histogram | None = None,
        tracing: Tracing | None = None,
        recorder: AdmissionRecorder | None = None,
    ) -> None:
        """`latency`: the time to settle each batch Envoy sends; `ledger_writes`: each
        store write of billed records; `tracing`: a span per batch (None: off)."""
        self._store = store
        self._latency = latency or Histogram()
        self._ledger_writes = ledger_writes or Histogram()
        self._tracing = tracing
        self.received = 0  # access-log entries handed over, before anything is decided
        # This process's authz: an entry whose admission it still buffers settles it from
        # there (see `settle`).
        self._recorder = recorder
        self._clock = clock
        self._wait = wait_seconds
        self._max_waiting = max_waiting
        self._waiting: deque[tuple[float, Observation]] = deque()  # (give up at, entry)
        # billed, replayed (settled before), unmatched (no admission in time), waited,
        # overflow (dropped unseen: too many waiting), unavailable (the store did not answer),
        # anonymous (no tenant, and none found by its request id: a request authz refused),
        # resolved (no tenant, found by its request id: then billed, replayed or unmatched),
        # buffered (settled from the admissions this process had not flushed yet: also
        # counted as billed or replayed). Not a Counter: storing a Counter's item goes
        # through a Python-level slot (it defines __delitem__), and every batch counts.
        self.outcomes: defaultdict[str, int] = defaultdict(int)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def settle(self, observations: Sequence[Observation]) -> None:
        started = perf_counter()
        span = None if self._tracing is None else self._tracing.start("meter batch")
        self.received += len(observations)
        try:
            await self._settle_new(observations)
        finally:
            self._latency.observe(perf_counter() - started)
            if span is not None:
                end_span(span, {"meshtoll.entries": len(observations)})

    async def _settle_new(self, observations: Sequence[Observation]) -> None:
        if self._recorder is not None:
            observations = await self._settle_buffered(self._recorder, observations)
            if not observations:
                return
        give_up_at = self._clock() + self._wait
        batch = [(give_up_at, seen) for seen in observations if seen[1]]
        anonymous = len(batch) < len(observations)
        if anonymous:
            batch += [(give_up_at, seen) for seen in observations if not seen[1]]
        await self._settle(batch, anonymous)

    async def _settle_buffered(
        self, recorder: AdmissionRecorder, observations: Sequence[Observation]
    ) -> Sequence[Observation]:
        """Settle the entries whose admissions this process's recorder still buffers; return
        the others. Envoy flushes its access log more often than authz its admissions (a
        full 64 KiB buffer every 70 ms at 10,000 requests a second), and the recorder holds an
        admission 0.5 to 1 s before writing it, so with one instance nearly every entry comes
        before its admission is stored: settled here, an entry costs no read of its
        admission and no wait, and the admission is never written (its record's usage.lua
        call marks the request id counted, as for any record). Should the record not be
        stored, the admissions go back to the recorder and the entries wait for them like
        any: billed == admitted either way."""
        records: list[UsageRecord] = []
        claimed: list[Admission] = []
        entries: list[Observation] = []
        others: list[Observation] = []
        claim = recorder.claim
        for seen in observations:
            request_id, tenant = seen[0], seen[1]
            admission = claim(tenant, request_id) if tenant else None
            if admission is None:
                others.append(seen)
            else:
                claimed.append(admission)
                entries.append(seen)
                records.append(admission.settled_by(seen, None))
        if not claimed:
            return observations
        stored = False
        started = perf_counter()
        try:
            counted = await self._store.record(records)
            self._ledger_writes.observe(perf_counter() - started)
            stored = True
        except StorageError as exc:
            self.outcomes["unavailable"] += 1
            log.warning("access-log entries wait: the usage store did not answer: %s", exc)
            give_up_at = self._clock() + self._wait
            self._wait_more([(give_up_at, seen) for seen in entries])
        finally:
            if stored:
                recorder.settled(claimed)
            else:  # also when the call was cancelled: the admissions are still owed
                recorder.unclaim(claimed)
        if stored:
            self.outcomes["billed"] += counted
            self.outcomes["replayed"] += len(records) - counted
            self.outcomes["buffered"] += len(records)
        return others

    async def retry_waiting(self) -> None:
        """Try again every entry that waits for its admission or its units."""
        if self._waiting:
            batch = list(self._waiting)
            self._waiting.clear()
            await self._settle(batch, not all(seen[1] for _, seen in batch))

    async def retry_forever(self) -> None:
        while True:
            await asyncio.sleep(RETRY_SECONDS)
            await self.retry_waiting()

    async def _settle(self, batch: list[tuple[float, Observation]], anonymous: bool) -> None:
        """Settle `batch`; with `anonymous`, some of its entries name no tenant and are first
        given the tenant of their request id's admission, if any."""
        try:
            if anonymous:
                batch = await self._resolve(batch)
            requests = [(seen[1], seen[0]) for _, seen in batch if seen[1]]
            found = await self._store.pending(requests)
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
            pending = found.get((seen[1], seen[0]))
            if pending is None:
                if now < give_up_at:
                    still_waiting.append((give_up_at, seen))
                else:
                    self.outcomes["unmatched" if seen[1] else "anonymous"] += 1
                continue
            admission, reported = pending
            if (
                reported is None
                and admission.awaits_report
                and is_billable_status(seen[2])
                and now < give_up_at
            ):
                still_waiting.append((give_up_at, seen))
                continue
            records.append(admission.settled_by(seen, reported))
        self._wait_more(still_waiting)
        if records:
            await self._record(records)

    async def _resolve(self, batch: list[tuple[float, Observation]]) -> list[tuple[float, Observation]]:
        """`batch` with its entries that name no tenant given the tenant their request id was
        admitted for, if any (the entry's own word is still only which admission it settles)."""
        request_ids = [seen[0] for _, seen in batch if not seen[1]]
        tenants = await self._store.admitted_tenants(request_ids)
        resolved: list[tuple[float, Observation]] = []
        for give_up_at, seen in batch:
            tenant = seen[1] or tenants.get(seen[0])
            if tenant and not seen[1]:
                seen = (seen[0], tenant, *seen[2:])
                self.outcomes["resolved"] += 1
            resolved.append((give_up_at, seen))
        return resolved

    async def _record(self, records: list[UsageRecord]) -> None:
        started = perf_counter()
        try:
            counted = await self._store.record(records)
            self._ledger_writes.observe(perf_counter() - started)
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
