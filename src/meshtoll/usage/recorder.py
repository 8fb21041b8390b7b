"""Authz remembers every request it admits, and ext_proc the units a body hook read: both
cost the request path a list append, and a background task hands them to the usage store
in batches (meter/reconcile.py bills what no access-log record settles)."""

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
    buffered and handed to the store together."""

    def __init__(self, store: UsageStore) -> None:
        self._store = store
        self._buffer: list[Admission] = []
        self._reports: list[ReportedUnits] = []
        self.dropped = 0
        self._observers: list[Callable[[Sequence[Admission]], Awaitable[None]]] = []

    def on_stored(self, observer: Callable[[Sequence[Admission]], Awaitable[None]]) -> None:
        """`observer` sees each batch of admissions once the store has it: what else wants to
        know of admitted requests (when a key was last used) rides on this flush instead of
        writing per request."""
        self._observers.append(observer)

    def admit(self, admission: Admission) -> None:
        if len(self._buffer) < MAX_BUFFERED:
            self._buffer.append(admission)
        else:
            self.dropped += 1

    def report_units(self, report: ReportedUnits) -> None:
        if len(self._reports) < MAX_BUFFERED:
            self._reports.append(report)
        else:
            self.dropped += 1

    async def flush(self) -> None:
        batch, self._buffer = self._buffer, []
        reports, self._reports = self._reports, []
        try:
            if batch:
                await self._store.admit(batch)
                stored, batch = batch, []
                for observe in self._observers:
                    await observe(stored)
            if reports:
                await self._store.report_units(reports)
        except StorageError as exc:
            # Kept, oldest first, for the next flush.
            self._buffer[:0] = batch
            self._reports[:0] = reports
            waiting = len(self._buffer) + len(self._reports)
            log.warning("admissions not stored yet (%d waiting): %s", waiting, exc)

    async def flush_forever(self) -> None:
        try:
            while True:
                await asyncio.sleep(FLUSH_SECONDS)
                await self.flush()
        finally:
            # On shutdown, what is buffered still goes out: these are billable requests.
            await self.flush()
