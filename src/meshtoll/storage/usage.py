"""The usage store: counters per tenant / route / status class / period, and a ledger of
every record, each request counted once however often its record arrives. The contract
(UsageStore), the key names, and the in-memory store; the Redis store is in usage_redis.

Counters live in one hash per tenant and period (month, day, hour), keyed with the
tenant's hash tag so that one tenant's batch is one Lua call on one Cluster shard.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from meshtoll.meter.records import Admission, ReportedUnits, UsageRecord, counter_increments

# (tenant, request id) -> the admission awaiting settlement, and the units a body hook
# reported for it (None: none reported)
PendingAdmissions = dict[tuple[str, str], tuple[Admission, int | None]]

DEFAULT_LEDGER_RETENTION_SECONDS = 400 * 86400


@dataclass(frozen=True, slots=True)
class RouteUsage:
    route: str
    requests: int
    units: int


@dataclass(frozen=True, slots=True)
class TenantUsage:
    tenant: str
    period: str  # YYYY-MM, YYYY-MM-DD or YYYY-MM-DDTHH
    requests: int = 0
    units: int = 0
    by_route: tuple[RouteUsage, ...] = ()
    by_status: dict[str, int] = field(default_factory=dict)
    unreconciled: int = 0
    by_plan: dict[str, int] = field(default_factory=dict)  # requests per plan they were admitted on


class UsageStore(Protocol):
    async def record(self, records: Sequence[UsageRecord]) -> int:
        """Count each record once; return how many were new."""
        ...

    async def usage(self, tenant: str, period: str) -> TenantUsage: ...

    async def ledger(self, tenant: str, since: float, until: float) -> list[UsageRecord]:
        """The tenant's records with since <= time < until, oldest first."""
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


def usage_key(tenant: str, period: str) -> str:
    return f"meshtoll_{{{tenant}}}_usage_{period}"


def seen_key(tenant: str, week: int) -> str:
    """The set of request ids counted in one week (counted from the epoch): where replays
    are found."""
    return f"meshtoll_{{{tenant}}}_seen_w{week}"


def ledger_key(tenant: str) -> str:
    return f"meshtoll_{{{tenant}}}_ledger"


def admissions_key(tenant: str) -> str:
    return f"meshtoll_{{{tenant}}}_admissions"


def reported_units_key(tenant: str) -> str:
    return f"meshtoll_{{{tenant}}}_reported_units"


def pending_key(tenant: str) -> str:
    return f"meshtoll_{{{tenant}}}_pending"


# The tenants with admissions awaiting settlement, so reconciliation never scans them all.
PENDING_TENANTS_KEY = "meshtoll_pending_tenants"


# The set of every tenant with usage: exports and invoices find them without the policy.
USAGE_TENANTS_KEY = "meshtoll_usage_tenants"


def tenant_usage(tenant: str, period: str, fields: dict[str, int]) -> TenantUsage:
    routes: dict[str, dict[str, int]] = {}
    statuses: dict[str, int] = {}
    plans: dict[str, int] = {}
    for name, value in fields.items():
        if name.startswith("route:"):
            route, _, what = name[6:].rpartition(":")
            routes.setdefault(route, {})[what] = value
        elif name.startswith("status:"):
            statuses[name[7:]] = value
        elif name.startswith("plan:"):
            plans[name[5:]] = value
    by_route = tuple(
        RouteUsage(route, counts.get("requests", 0), counts.get("units", 0))
        for route, counts in sorted(routes.items())
    )
    return TenantUsage(
        tenant,
        period,
        fields.get("requests", 0),
        fields.get("units", 0),
        by_route,
        statuses,
        fields.get("unreconciled", 0),
        plans,
    )


class MemoryUsageStore:
    def __init__(
        self,
        *,
        ledger_retention_seconds: float = DEFAULT_LEDGER_RETENTION_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ledger_retention = ledger_retention_seconds
        self._clock = clock
        self._seen: set[tuple[str, str]] = set()
        self._hashes: dict[str, dict[str, int]] = {}
        self.ledger_records: list[UsageRecord] = []
        self._pending: dict[tuple[str, str], Admission] = {}
        self._reported: dict[tuple[str, str], int] = {}
        self._reported_at: dict[tuple[str, str], float] = {}
        self._tenants: set[str] = set()

    async def record(self, records: Sequence[UsageRecord]) -> int:
        counted = 0
        for record in records:
            self._pending.pop((record.tenant, record.request_id), None)
            self._reported.pop((record.tenant, record.request_id), None)
            self._reported_at.pop((record.tenant, record.request_id), None)
            if (record.tenant, record.request_id) in self._seen:
                continue
            self._seen.add((record.tenant, record.request_id))
            increments = counter_increments(
                record.route, record.plan, record.status_class, record.source, 1, record.units
            )
            for period in record.periods():
                counts = self._hashes.setdefault(usage_key(record.tenant, period), {})
                for name, amount in increments:
                    counts[name] = counts.get(name, 0) + amount
            self.ledger_records.append(record)
            self._tenants.add(record.tenant)
            counted += 1
        oldest = time.time() - self._ledger_retention
        if self.ledger_records and self.ledger_records[0].time < oldest:
            self.ledger_records = [r for r in self.ledger_records if r.time >= oldest]
        return counted

    async def usage(self, tenant: str, period: str) -> TenantUsage:
        return tenant_usage(tenant, period, dict(self._hashes.get(usage_key(tenant, period), {})))

    async def ledger(self, tenant: str, since: float, until: float) -> list[UsageRecord]:
        return [r for r in self.ledger_records if r.tenant == tenant and since <= r.time < until]

    async def admit(self, admissions: Sequence[Admission]) -> None:
        for admission in admissions:
            if (admission.tenant, admission.request_id) not in self._seen:
                self._pending[(admission.tenant, admission.request_id)] = admission

    async def report_units(self, reports: Sequence[ReportedUnits]) -> None:
        for report in reports:
            if (report.tenant, report.request_id) not in self._seen:
                self._reported[(report.tenant, report.request_id)] = report.units
                self._reported_at[(report.tenant, report.request_id)] = self._clock()

    async def overdue(self, before: float, limit: int = 1000) -> list[Admission]:
        found = sorted((a for a in self._pending.values() if self._due(a) < before), key=lambda a: a.time)
        return [with_reported_units(a, self._reported.get((a.tenant, a.request_id))) for a in found[:limit]]

    def _due(self, admission: Admission) -> float:
        # A report means the stream has ended: the ordinary grace counts from then.
        reported_at = self._reported_at.get((admission.tenant, admission.request_id))
        return admission.due() if reported_at is None else min(admission.due(), reported_at)

    async def pending(self, requests: Sequence[tuple[str, str]]) -> PendingAdmissions:
        return {
            key: (admission, self._reported.get(key))
            for key in requests
            if (admission := self._pending.get(key)) is not None
        }

    async def backlog(self) -> int:
        return len(self._pending)

    async def tenants(self) -> list[str]:
        return sorted(self._tenants)

    async def has_usage(self, tenant: str) -> bool:
        return tenant in self._tenants

    async def close(self) -> None:
        return None


def with_reported_units(admission: Admission, reported: int | None) -> Admission:
    return admission if reported is None else dataclasses.replace(admission, units=reported)


def open_usage_store(
    url: str | None, *, ledger_retention_seconds: float = DEFAULT_LEDGER_RETENTION_SECONDS
) -> UsageStore:
    if url is None:
        return MemoryUsageStore(ledger_retention_seconds=ledger_retention_seconds)
    from meshtoll.storage.usage_redis import RedisUsageStore

    return RedisUsageStore(url, ledger_retention_seconds=ledger_retention_seconds)
