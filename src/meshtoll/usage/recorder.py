"""Authz remembers every request it admits, and ext_proc the units a body hook read: both
cost the request path a dict or list insert, and a background task hands them to the usage
store in batches (meter/reconcile.py bills what no access-log record settles). The meter
settles an admission still buffered here directly (meter/settle.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from meshtoll.errors import StorageError
from meshtoll.usage.records import Admission, ReportedUnits
from meshtoll.usage.store import UsageStore

log = logging.getLogger("meshtoll.meter")

FLUSH_SECONDS = 0.5


MAX_BUFFERED = 1_000_000  # admissions kept in memory while the store is away


class AdmissionRecorder:
    """Admissions (from authz) and the units body hooks reported for them (from ext_proc),
    buffered and handed to the store together.

    Each round of `flush_forever` writes the admissions of the round before (`flush(held=
    True)`): an admission stays here one to two rounds, so that the access-log entry of a
    metered request, which Envoy flushes every half second (or every 64 KiB), nearly always
    finds it here and settles it with no write of the admission, no read back and no delete
    (meter/settle.py). `flush()` writes everything (shutdown, tests)."""

    def __init__(self, store: UsageStore) -> None:
        self._store = store
        # By (tenant, request id): the meter takes an admission out while it is still here
        # (claim), so that an access-log entry that comes before the flush settles it at
        # once, and the admission is never written. `_held` is the previous round's, written
        # at the next one; `_buffer` the current round's.
        self._buffer: dict[tuple[str, str], Admission] = {}
        self._held: dict[tuple[str, str], Admission] = {}
        self._reports: list[ReportedUnits] = []
        # Reports are held a round too: one written before its admission would not move the
        # admission's due time (the store's report_units updates pending admissions only).
        self._held_reports: list[ReportedUnits] = []
        # Admissions the meter settled from the buffer: never stored, but the flush's
        # observers see them all the same (they were admitted).
        self._settled: list[Admission] = []
        self.dropped = 0
        self._observers: list[Callable[[Sequence[Admission]], Awaitable[None]]] = []

    def on_stored(self, observer: Callable[[Sequence[Admission]], Awaitable[None]]) -> None:
        """`observer` sees each batch of admissions once the store has it: what else wants to
        know of admitted requests (when a key was last used) rides on this flush instead of
        writing per request."""
        self._observers.append(observer)

    def admit(self, admission: Admission) -> None:
        if len(self._buffer) + len(self._held) < MAX_BUFFERED:
            self._buffer[admission.tenant, admission.request_id] = admission
        else:
            self.dropped += 1

    def claim(self, tenant: str, request_id: str) -> Admission | None:
        """The admission of this tenant's request if it waits here for the next flush and
        bills without waiting for reported units, taken out: whoever claims it must either
        store its usage record and call `settled`, or give it back with `unclaim`."""
        key = tenant, request_id
        buffer = self._buffer
        admission = buffer.get(key)
        if admission is None:
            buffer = self._held
            admission = buffer.get(key)
            if admission is None:
                return None
        if admission.awaits_report:
            return None
        del buffer[key]
        return admission

    def unclaim(self, admissions: Sequence[Admission]) -> None:
        """Claimed admissions whose records were not stored: written at the next flush."""
        self._held.update(((a.tenant, a.request_id), a) for a in admissions)

    def settled(self, admissions: Sequence[Admission]) -> None:
        """Claimed admissions whose usage records are stored: the next flush's observers see them."""
        self._settled.extend(admissions)

    def report_units(self, report: ReportedUnits) -> None:
        if len(self._reports) + len(self._held_reports) < MAX_BUFFERED:
            self._reports.append(report)
        else:
            self.dropped += 1

    async def flush(self, *, held: bool = False) -> None:
        """Hand the buffered admissions and reports to the store: all of them, or with `held`
        only those held since the last such flush (the newer ones are held now)."""
        if held:
            buffered, self._held, self._buffer = self._held, self._buffer, {}
            reports, self._held_reports, self._reports = self._held_reports, self._reports, []
        else:
            buffered = self._held | self._buffer if self._held else self._buffer
            reports = self._held_reports + self._reports
            self._held, self._buffer, self._held_reports, self._reports = {}, {}, [], []
        batch = list(buffered.values())
        try:
            if batch:
                await self._store.admit(batch)
                stored, batch = batch, []
            else:
                stored = []
            settled, self._settled = self._settled, []
            if stored or settled:
                seen = stored + settled if settled else stored
                for observe in self._observers:
                    await observe(seen)
            if reports:
                await self._store.report_units(reports)
        except StorageError as exc:
            # Kept, oldest first, for the next flush.
            self._held = {(a.tenant, a.request_id): a for a in batch} | self._held
            self._held_reports[:0] = reports
            waiting = len(self._held) + len(self._buffer) + len(self._held_reports) + len(self._reports)
            log.warning("admissions not stored yet (%d waiting): %s", waiting, exc)

    async def flush_forever(self) -> None:
        try:
            while True:
                await asyncio.sleep(FLUSH_SECONDS)
                await self.flush(held=True)
        finally:
            # On shutdown, what is buffered still goes out: these are billable requests.
            await self.flush()
