"""The run-time tenants an instance serves: the registry's records, installed into the
compiled policy decisions read, one tenant at a time.

A change to one tenant validates and installs that tenant alone, so applying it costs the
same with 10 or 100,000 tenants. A new version of the policy file starts without run-time
tenants (it is compiled from the file in a thread); every record is installed into it, in
slices between which decisions go on with the old version, before it replaces the old one.
Changes wait for that (a lock), so none is applied to a version about to be dropped.

Where a record cannot be served next to this instance's policy file (a tenant of the same
name in the file, a key hash the file has, a plan the file lacks), the file wins: the
tenant is skipped here, logged, counted (/api/instances, metrics) and installed again as soon
as a change or a new file version lets it. Two instances with different files may so serve
different run-time tenants; each says how many it skips.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Iterable

from meshtoll.errors import PolicyError
from meshtoll.policy import CompiledPolicy
from meshtoll.policy.document import format_path
from meshtoll.policy.reload import PolicyHolder
from meshtoll.policy.runtime import RuntimeTenantReader
from meshtoll.registry.records import TenantRecord

log = logging.getLogger("meshtoll.tenants")

# Records installed between two yields to the event loop while a whole set is installed: a
# slice takes a few milliseconds, so decisions never wait longer than that.
SLICE = 500


class InstalledTenants:
    def __init__(self, holder: PolicyHolder) -> None:
        self._holder = holder
        self.records: dict[str, TenantRecord] = {}  # every record applied, served or skipped
        self.skipped: dict[str, str] = {}  # tenant -> why this instance does not serve it
        self.version = 0  # the registry version applied
        self.cursor = ""  # the change log position applied
        self._lock = asyncio.Lock()
        self._reader = RuntimeTenantReader()
        self._listeners: list[Callable[[CompiledPolicy], None]] = []
        holder.before_replace(self._install_all_into)

    def on_change(self, listener: Callable[[CompiledPolicy], None]) -> None:
        """Called with the policy after each batch of changes (the JWKS cache hears of new
        issuers this way)."""
        self._listeners.append(listener)

    async def apply(
        self, records: dict[str, TenantRecord | None], version: int, cursor: str, *, exact: bool = False
    ) -> None:
        """Install the given records (None: the tenant is gone) and note the version they
        bring this instance to. A record older than the one installed is ignored (a slow
        read), unless `exact`: a snapshot, which may come from a registry started anew."""
        async with self._lock:
            policy = self._holder.current
            for index, (name, found) in enumerate(records.items()):
                self._apply_one(policy, name, found, exact)
                if index % SLICE == SLICE - 1:
                    await _between_slices()
            self.version = version if exact else max(self.version, version)
            self.cursor = cursor
        self._changed(policy)

    async def apply_own(self, name: str, record: TenantRecord | None) -> None:
        """A change this instance committed itself, installed at once rather than when the
        change log brings it back (which it still does: the version is noted then)."""
        async with self._lock:
            policy = self._holder.current
            self._apply_one(policy, name, record, exact=False)
        self._changed(policy)

    async def replace_all(self, records: Iterable[TenantRecord], version: int, cursor: str) -> None:
        """Make the installed set exactly `records` (a snapshot of the registry)."""
        fresh: dict[str, TenantRecord | None] = {record.name: record for record in records}
        gone = dict.fromkeys(set(self.records) - set(fresh))
        await self.apply({**gone, **fresh}, version, cursor, exact=True)

    def _apply_one(self, policy: CompiledPolicy, name: str, record: TenantRecord | None, exact: bool) -> None:
        current = self.records.get(name)
        if record is not None and current is not None and record.version < current.version and not exact:
            return  # an older read of a tenant already newer here
        self.skipped.pop(name, None)
        if record is None:
            self.records.pop(name, None)
            policy.uninstall(name)
            return
        self.records[name] = record
        self._install(policy, record)

    def _install(self, policy: CompiledPolicy, record: TenantRecord) -> None:
        try:
            tenant = self._reader.tenant(record, policy.policy.plans)
        except PolicyError as exc:
            policy.uninstall(record.name)
            self._skip(record.name, "; ".join(f"{p.path}: {p.message}" for p in exc.problems[:5]))
            return
        problems = policy.install(tenant)
        if problems:
            self._skip(
                record.name, "; ".join(f"{format_path(path)}: {message}" for path, message in problems)
            )

    def _skip(self, name: str, why: str) -> None:
        if self.skipped.get(name) != why:
            log.warning("run-time tenant %r is not served by this instance: %s", name, why)
        self.skipped[name] = why

    async def _install_all_into(self, policy: CompiledPolicy) -> None:
        """A new file version: every record into it before it is used (see the module)."""
        async with self._lock:
            skipped: dict[str, str] = {}
            self.skipped, before = skipped, self.skipped
            try:
                for index, record in enumerate(self.records.values()):
                    self._install(policy, record)
                    if index % SLICE == SLICE - 1:
                        await _between_slices()
            except BaseException:
                self.skipped = before
                raise
        if self.records:
            log.info(
                "policy reload: %d run-time tenants installed, %d skipped",
                len(self.records) - len(skipped),
                len(skipped),
            )
        self._changed(policy)

    def _changed(self, policy: CompiledPolicy) -> None:
        for listener in self._listeners:
            listener(policy)


async def _between_slices() -> None:
    """A young collection, then decisions. Installing a tenant frees about what it allocates
    (the objects of the version it replaces), and CPython counts frees against allocations: the
    count that triggers young collections stays flat, and without this the young generation
    would hold the whole new set (some 500,000 objects at 100,000 tenants) for the next young
    collection to walk at once, 100-280 ms with the event loop stopped. A slice's objects are
    a few thousand: collected here they reach the oldest generation, which is out of the full
    collections while a reload is built (server/long_lived.py) and frozen after. Not while
    the collector is disabled: whoever disabled it (a test looking for cycles) wants none."""
    if gc.isenabled():
        gc.collect(1)
    await asyncio.sleep(0)
