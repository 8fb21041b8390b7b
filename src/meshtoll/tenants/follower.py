"""Following the registry: an instance loads every record when it starts, then applies each
change the registry's log announces, tenant by tenant, within a second of its commit.

Nothing is lost to a missed notice: the log is read on from the last position applied, so
an instance cut off from Redis catches up when Redis is back; a gap in the versions (the log
was trimmed past it) or a registry whose version went back (started anew) makes it load
everything again; and every RESYNC_SECONDS of quiet it compares its version with the
registry's, so a log it cannot read on from (a Redis replaced by an empty one) is noticed
too. While Redis cannot be reached, the instance serves the tenants it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from meshtoll.errors import StorageError
from meshtoll.registry.records import Change
from meshtoll.registry.store import TenantRegistry
from meshtoll.tenants.installed import InstalledTenants

log = logging.getLogger("meshtoll.tenants")

# How long one read of the log waits for a change: a change is seen as soon as it is
# committed, this only bounds how often a quiet instance asks.
WAIT_SECONDS = 1.0
RESYNC_SECONDS = 10.0
RETRY_SECONDS = 1.0


class RegistryFollower:
    def __init__(
        self,
        registry: TenantRegistry,
        installed: InstalledTenants,
        *,
        wait_seconds: float = WAIT_SECONDS,
        resync_seconds: float = RESYNC_SECONDS,
        retry_seconds: float = RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        loaded_all: Callable[[], None] = lambda: None,
        building: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    ) -> None:
        self._registry = registry
        self._installed = installed
        self._wait = wait_seconds
        self._resync = resync_seconds
        self._retry = retry_seconds
        self._clock = clock
        # After each snapshot installed but one load_first installs: the start has its own.
        self._loaded_all = loaded_all
        # Around each snapshot, from its records decoded to `loaded_all` (no full garbage
        # collection walks a half-installed snapshot).
        self._building = building
        self.loaded = asyncio.Event()  # the first snapshot is installed
        self.reloads = 0  # snapshots loaded after the first (gaps, resets)
        self.changes_applied = 0  # changes read from the registry's log and installed
        self._failing = False
        self._must_reload = True
        self._checked_at = clock()
        self._read_at = clock()  # the last read that left this instance as current as the registry

    def staleness(self) -> float:
        """Seconds since this instance last knew it was as current as the registry: about
        WAIT_SECONDS when it follows, growing while the registry cannot be read."""
        return self._clock() - self._read_at

    async def load_first(self) -> None:
        """The first snapshot, while the instance starts; when the registry cannot be reached,
        `run_forever` goes on trying (and the instance is not ready until it succeeds)."""
        try:
            await self._load(starting=True)
        except StorageError as exc:
            log.warning("tenant registry unreachable at start, trying again: %s", exc)
            self._failing = True

    async def run_forever(self) -> None:
        while True:
            try:
                if self._must_reload:
                    await self._load()
                await self._follow()
            except StorageError as exc:
                if not self._failing:
                    log.warning(
                        "tenant registry unreachable, serving the run-time tenants known so far: %s", exc
                    )
                self._failing = True
                await asyncio.sleep(self._retry)
                continue
            if self._failing:
                log.info("tenant registry reachable again at version %d", self._installed.version)
                self._failing = False

    async def _load(self, *, starting: bool = False) -> None:
        with self._building():
            await self._load_all(starting)

    async def _load_all(self, starting: bool) -> None:
        started = time.monotonic()
        snapshot = await self._registry.snapshot()
        for name, why in snapshot.unreadable:
            log.error("tenant registry record %r cannot be read, not served: %s", name, why)
        await self._installed.replace_all(snapshot.records, snapshot.version, snapshot.cursor)
        if not starting:
            self._loaded_all()
        if self.loaded.is_set():
            self.reloads += 1
        self.loaded.set()
        self._must_reload = False
        self._checked_at = self._read_at = self._clock()
        log.info(
            "run-time tenants loaded: %d at version %d in %.2f s (%d not served here)",
            len(snapshot.records),
            snapshot.version,
            time.monotonic() - started,
            len(self._installed.skipped),
        )

    async def _follow(self) -> None:
        changes = await self._registry.changes(self._installed.cursor, self._wait)
        if changes:
            await self._apply(changes)
            return
        if self._clock() - self._checked_at >= self._resync:
            await self._check_version()
        if not self._must_reload:
            self._read_at = self._clock()  # nothing new in the log: current as of this read

    async def _apply(self, changes: list[Change]) -> None:
        applied = self._installed.version
        if changes[0].version != applied + 1:
            # Trimmed past this instance's position, or a registry started anew.
            log.warning(
                "tenant registry log jumped from version %d to %d: loading every tenant again",
                applied,
                changes[0].version,
            )
            self._must_reload = True
            return
        names = list(dict.fromkeys(change.tenant for change in changes))
        records = await self._registry.get_many(names)
        await self._installed.apply(records, changes[-1].version, changes[-1].cursor)
        self.changes_applied += len(changes)
        self._checked_at = self._read_at = self._clock()

    async def _check_version(self) -> None:
        self._checked_at = self._clock()
        version, _ = await self._registry.head()
        if version == self._installed.version:
            return
        # A change may have landed since the last read: the log says whether it follows on.
        changes = await self._registry.changes(self._installed.cursor, 0)
        if changes and changes[0].version == self._installed.version + 1:
            await self._apply(changes)
            return
        log.warning(
            "tenant registry is at version %d, this instance at %d with no changes between: "
            "loading every tenant again",
            version,
            self._installed.version,
        )
        self._must_reload = True
