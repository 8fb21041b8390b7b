"""The usage store in memory: for a single process without Redis, and the reference the
Redis store's contract tests are run against."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from meshtoll.keys import usage_key
from meshtoll.usage.ledger import LedgerEntry, LedgerPosition, position_key
from meshtoll.usage.records import Admission, ReportedUnits, UsageRecord, with_reported_units
from meshtoll.usage.store import DEFAULT_LEDGER_RETENTION_SECONDS, PendingAdmissions
from meshtoll.usage.tallies import TenantUsage, counter_increments, tenant_usage


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
        self._admitted_tenants: dict[str, str] = {}  # request id -> tenant, while pending
        # Each tenant's ledger in append order, as the Redis stream keeps it.
        self._entries: dict[str, list[LedgerEntry]] = {}
        self._appended: dict[str, int] = {}
        self._last_position = (0, 0)

    async def record(self, records: Sequence[UsageRecord]) -> int:
        counted = 0
        new: dict[str, list[UsageRecord]] = {}
        for record in records:
            self._pending.pop((record.tenant, record.request_id), None)
            self._reported.pop((record.tenant, record.request_id), None)
            self._reported_at.pop((record.tenant, record.request_id), None)
            self._admitted_tenants.pop(record.request_id, None)
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
            new.setdefault(record.tenant, []).append(record)
            self._tenants.add(record.tenant)
            counted += 1
        for tenant, batch in new.items():
            self._append(tenant, batch)
        oldest = self._clock() - self._ledger_retention
        if self.ledger_records and self.ledger_records[0].time < oldest:
            self.ledger_records = [r for r in self.ledger_records if r.time >= oldest]
        return counted

    def _append(self, tenant: str, batch: list[UsageRecord]) -> None:
        """One ledger entry, its position after every earlier one (as Redis makes them)."""
        ms = max(int(self._clock() * 1000), self._last_position[0])
        sequence = self._last_position[1] + 1 if ms == self._last_position[0] else 0
        self._last_position = (ms, sequence)
        last = self._appended[tenant] = self._appended.get(tenant, 0) + len(batch)
        entries = self._entries.setdefault(tenant, [])
        entries.append(LedgerEntry(f"{ms}-{sequence}", last, tuple(batch)))
        # Kept as long as Redis keeps its entries (XADD MINID: by when they were appended).
        while entries[0].appended < ms / 1000 - self._ledger_retention:
            entries.pop(0)

    async def ledger_after(self, tenant: str, after: LedgerPosition, limit: int) -> list[LedgerEntry]:
        start = position_key(after)
        entries = self._entries.get(tenant, [])
        return [entry for entry in entries if position_key(entry.position) > start][:limit]

    async def ledger_appended(self, tenants: Sequence[str]) -> dict[str, int]:
        return {tenant: self._appended.get(tenant, 0) for tenant in tenants}

    async def usage(self, tenant: str, period: str) -> TenantUsage:
        return tenant_usage(tenant, period, dict(self._hashes.get(usage_key(tenant, period), {})))

    async def ledger(self, tenant: str, since: float, until: float) -> list[UsageRecord]:
        return [r for r in self.ledger_records if r.tenant == tenant and since <= r.time < until]

    async def admit(self, admissions: Sequence[Admission]) -> None:
        for admission in admissions:
            if (admission.tenant, admission.request_id) not in self._seen:
                self._pending[(admission.tenant, admission.request_id)] = admission
                self._admitted_tenants[admission.request_id] = admission.tenant

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

    async def admitted_tenants(self, request_ids: Sequence[str]) -> dict[str, str]:
        return {
            request_id: tenant
            for request_id in request_ids
            if (tenant := self._admitted_tenants.get(request_id)) is not None
        }

    async def backlog(self) -> int:
        return len(self._pending)

    async def tenants(self) -> list[str]:
        return sorted(self._tenants)

    async def has_usage(self, tenant: str) -> bool:
        return tenant in self._tenants

    async def close(self) -> None:
        return None
