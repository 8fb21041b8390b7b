"""Nothing billable is lost: authz remembers every request it admits, and admissions whose
access-log record never arrives are billed from what authz knew, marked unreconciled.

Envoy's access-log stream is best effort (entries buffered in Envoy are dropped when the
stream breaks), so the admissions are the ground truth of what was let through. Recording
one costs authz a list append; a background task hands them to the store in batches.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from meshtoll.errors import StorageError
from meshtoll.usage.store import UsageStore

log = logging.getLogger("meshtoll.meter")


# Bounds one reconciliation call (about a million admissions): a store that failed to
# settle what it billed must not keep the loop going forever.
MAX_BATCHES = 1000


async def reconcile(store: UsageStore, now: float, grace: float, batch: int = 1000) -> int:
    """Bill every admission due more than `grace` seconds ago that no access-log record
    settled, in batches of about `batch` until none is left."""
    billed = 0
    for _ in range(MAX_BATCHES):
        overdue = await store.overdue(now - grace, batch)
        if not overdue:
            break
        billed += await store.record([admission.as_record() for admission in overdue])
    return billed


class Reconciler:
    """Runs reconciliation every second or so and keeps the backlog (admissions awaiting
    their access-log record) in view for /metrics."""

    def __init__(self, store: UsageStore, grace: float, clock: Callable[[], float]) -> None:
        self._store = store
        self._grace = grace
        self._clock = clock
        self.backlog = 0
        self.billed = 0

    async def run_forever(self) -> None:
        # Each round drains everything overdue, however much that is: catching up after an
        # outage runs at Redis's speed, not at a fixed number per round.
        interval = min(1.0, max(0.2, self._grace / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                billed = await reconcile(self._store, self._clock(), self._grace)
                self.backlog = await self._store.backlog()
            except StorageError as exc:
                log.warning("reconciliation skipped: %s", exc)
                continue
            self.billed += billed
            if billed:
                log.info("billed %d admitted requests from authz records (no access-log record)", billed)
