"""The usage store's contract: counters per tenant / route / status class / period, and a
ledger of every record, each request counted once however often its record arrives. The
stores themselves (memory, Redis) are in meshtoll.storage.

Counters live in one hash per tenant and period (month, day, hour), keyed with the
tenant's hash tag (meshtoll.keys) so that one tenant's batch is one Lua call on one
Cluster shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from meshtoll.usage.ledger import LedgerEntry, LedgerPosition
from meshtoll.usage.records import Admission, ReportedUnits, UsageRecord
from meshtoll.usage.tallies import TenantUsage

# (tenant, request id) -> the admission awaiting settlement, and the units a body hook
# reported for it (None: none reported)
PendingAdmissions = dict[tuple[str, str], tuple[Admission, int | None]]

DEFAULT_LEDGER_RETENTION_SECONDS = 400 * 86400
# How long an admission's request id is sure to name its tenant once the admission is
# stored: an entry without a tenant waits for its admission 5 s at most (meter/settle.py).
ADMITTED_TENANTS_SECONDS = 10.0


class UsageStore(Protocol):
    async def record(self, records: Sequence[UsageRecord]) -> int:
        """Count each record once; return how many were new."""
        ...

    async def usage(self, tenant: str, period: str) -> TenantUsage: ...

    async def ledger(self, tenant: str, since: float, until: float) -> list[UsageRecord]:
        """The tenant's records with since <= time < until, oldest first."""
        ...

    async def ledger_after(self, tenant: str, after: LedgerPosition, limit: int) -> list[LedgerEntry]:
        """The tenant's ledger entries appended after `after`, in append order, at most
        `limit` of them (usage/ledger.py)."""
        ...

    async def ledger_appended(self, tenants: Sequence[str]) -> dict[str, int]:
        """How many records each tenant's ledger has ever been appended (0 for none), in one
        round trip: what a reader compares its place with."""
        ...

    async def admit(self, admissions: Sequence[Admission]) -> None:
        """Remember admitted requests until their usage record settles them."""
        ...

    async def report_units(self, reports: Sequence[ReportedUnits]) -> None:
        """Remember the units a body hook read for admitted requests: an overdue admission
        bills those instead of its route's cost."""
        ...

    async def overdue(self, before: float, limit: int = 1000) -> list[Admission]:
        """Admissions due (Admission.due) before `before` that no usage record has settled
        yet, with the units reported for them: about `limit` of them, oldest first within
        each tenant; call again until none is left."""
        ...

    async def pending(self, requests: Sequence[tuple[str, str]]) -> PendingAdmissions:
        """Of these (tenant, request id) pairs, the admissions still awaiting settlement."""
        ...

    async def admitted_tenants(self, request_ids: Sequence[str]) -> dict[str, str]:
        """Of these request ids, the tenant each was admitted for: every admission stored in
        the last ADMITTED_TENANTS_SECONDS and not settled yet is found (one settled since
        may be named too). For access-log entries that name no tenant."""
        ...

    async def backlog(self) -> int:
        """How many admissions await settlement, all tenants together."""
        ...

    async def tenants(self) -> list[str]:
        """Every tenant that has usage in the store, whatever today's policy says, sorted."""
        ...

    async def has_usage(self, tenant: str) -> bool:
        """Whether the tenant is in that index."""
        ...

    async def close(self) -> None: ...
