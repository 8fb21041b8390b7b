"""When each run-time key was last used, at minute resolution, without a store write per
request: read off the admissions authz already hands to the store every half second
(AdmissionRecorder.on_stored), and written only when a key's minute moves on, all such keys of
a flush in one command."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from meshtoll.errors import StorageError
from meshtoll.registry.store import TenantRegistry
from meshtoll.tenants.installed import InstalledTenants
from meshtoll.usage.records import Admission

log = logging.getLogger("meshtoll.tenants")

# Keys whose last written minute is remembered; beyond, the memory starts afresh (a key then
# costs one more write in its current minute).
REMEMBERED = 200_000


class KeyUse:
    def __init__(self, registry: TenantRegistry, installed: InstalledTenants) -> None:
        self._registry = registry
        self._installed = installed
        self._written: dict[tuple[str, str], int] = {}

    async def admitted(self, admissions: Sequence[Admission]) -> None:
        records = self._installed.records
        due: dict[tuple[str, str], int] = {}
        for admission in admissions:
            record = records.get(admission.tenant)
            if record is None:
                continue  # a file tenant
            used = (admission.tenant, admission.consumer)
            minute = int(admission.time // 60)
            if self._written.get(used, -1) < minute and due.get(used, -1) < minute:
                due[used] = minute
        # The consumer of an admission is the key's id for an API key, a claim for a JWT.
        due = {used: minute for used, minute in due.items() if records[used[0]].key(used[1]) is not None}
        if not due:
            return
        try:
            await self._registry.record_key_use(due)
        except StorageError as exc:
            log.debug("key use not recorded this time: %s", exc)
            return
        if len(self._written) > REMEMBERED:
            self._written.clear()
        self._written.update(due)
