"""The usage store: counters per tenant / route / status class / period, and a ledger of
every record, each request counted once however often its record arrives.

Counters live in one hash per tenant and period (month, day, hour), keyed with the
tenant's hash tag so that one tenant's batch is one Lua call on one Cluster shard.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, Protocol

import hiredis
import redis.asyncio
import redis.exceptions

from meshtoll.errors import StorageUnavailable
from meshtoll.meter.records import Admission, UsageRecord
from meshtoll.storage.redis import redis_py_client
from meshtoll.storage.resp import LeanRedis
from meshtoll.storage.urls import parse_redis_url

SEEN_SECONDS = 7 * 86400  # a replayed batch is recognised for a week
DEFAULT_LEDGER_RETENTION_SECONDS = 400 * 86400
RETENTION_SECONDS = {"month": 3 * 366 * 86400, "day": 400 * 86400, "hour": 8 * 86400}
USAGE_SCRIPT = (resources.files("meshtoll") / "storage" / "lua" / "usage.lua").read_text


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

    async def overdue(self, before: float, limit: int = 1000) -> list[Admission]:
        """Admissions made before `before` that no usage record has settled yet."""
        ...

    async def close(self) -> None: ...


def usage_key(tenant: str, period: str) -> str:
    return f"meshtoll_{{{tenant}}}_usage_{period}"


def seen_key(tenant: str, request_id: str) -> str:
    return f"meshtoll_{{{tenant}}}_seen_{request_id}"


def ledger_key(tenant: str) -> str:
    return f"meshtoll_{{{tenant}}}_ledger"


def admissions_key(tenant: str) -> str:
    return f"meshtoll_{{{tenant}}}_admissions"


def pending_key(tenant: str) -> str:
    return f"meshtoll_{{{tenant}}}_pending"


# The tenants with admissions awaiting settlement, so reconciliation never scans them all.
PENDING_TENANTS_KEY = "meshtoll_pending_tenants"


def tenant_usage(tenant: str, period: str, fields: dict[str, int]) -> TenantUsage:
    routes: dict[str, dict[str, int]] = {}
    statuses: dict[str, int] = {}
    for name, value in fields.items():
        if name.startswith("route:"):
            route, _, what = name[6:].rpartition(":")
            routes.setdefault(route, {})[what] = value
        elif name.startswith("status:"):
            statuses[name[7:]] = value
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
    )


class MemoryUsageStore:
    def __init__(self, *, ledger_retention_seconds: float = DEFAULT_LEDGER_RETENTION_SECONDS) -> None:
        self._ledger_retention = ledger_retention_seconds
        self._seen: set[tuple[str, str]] = set()
        self._hashes: dict[str, dict[str, int]] = {}
        self.ledger_records: list[UsageRecord] = []
        self._pending: dict[tuple[str, str], Admission] = {}

    async def record(self, records: Sequence[UsageRecord]) -> int:
        counted = 0
        for record in records:
            self._pending.pop((record.tenant, record.request_id), None)
            if (record.tenant, record.request_id) in self._seen:
                continue
            self._seen.add((record.tenant, record.request_id))
            for period in record.periods():
                counts = self._hashes.setdefault(usage_key(record.tenant, period), {})
                for name, amount in _increments(record):
                    counts[name] = counts.get(name, 0) + amount
            self.ledger_records.append(record)
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

    async def overdue(self, before: float, limit: int = 1000) -> list[Admission]:
        found = sorted((a for a in self._pending.values() if a.time < before), key=lambda a: a.time)
        return found[:limit]

    async def close(self) -> None:
        return None


def _increments(record: UsageRecord) -> list[tuple[str, int]]:
    # What usage.lua adds for one record; the memory store's copy of it.
    found = [
        ("requests", 1),
        ("units", record.units),
        (f"route:{record.route}:requests", 1),
        (f"route:{record.route}:units", record.units),
        (f"status:{record.status_class}", 1),
    ]
    if record.source == "admission":
        found.append(("unreconciled", 1))
    return found


class RedisUsageStore:
    def __init__(
        self,
        url: str,
        *,
        timeout_ms: int = 1000,
        ledger_retention_seconds: float = DEFAULT_LEDGER_RETENTION_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ledger_retention = ledger_retention_seconds
        self._clock = clock
        target = parse_redis_url(url)
        self._client, self._sentinels = redis_py_client(target, timeout_ms / 1000)
        self._script = self._client.register_script(USAGE_SCRIPT())
        # Standalone Redis: usage batches go through the pipelining client, whose C packing
        # costs a twentieth of redis-py's per argument (every record brings five). A batch
        # may be resent safely: records are counted once by request id.
        self._lean: LeanRedis | None = None
        if target.topology == "standalone":
            host, port = target.nodes[0]
            self._lean = LeanRedis(
                host, port, timeout=timeout_ms / 1000, db=target.db, password=target.password,
                username=target.username, tls=target.tls,
            )  # fmt: skip
            self._script_text = USAGE_SCRIPT().encode()
            self._sha = hashlib.sha1(self._script_text).hexdigest()

    async def record(self, records: Sequence[UsageRecord]) -> int:
        by_tenant: dict[str, list[UsageRecord]] = {}
        for record in records:
            by_tenant.setdefault(record.tenant, []).append(record)
        counted = 0
        # Ledger ids are Redis's clock in ms: entries older than the retention are trimmed.
        oldest_id = max(0, int((self._clock() - self._ledger_retention) * 1000))
        try:
            for tenant, batch in by_tenant.items():
                keys = [key for record in batch for key in _record_keys(record)]
                keys += [admissions_key(tenant), pending_key(tenant), ledger_key(tenant)]
                arguments: list[Any] = [SEEN_SECONDS, oldest_id, *RETENTION_SECONDS.values()]
                for r in batch:
                    arguments += (r.request_id, r.route, r.units, r.status_class, r.source, r.to_json())
                counted += int(await self._run_script(keys, arguments))
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StorageUnavailable(f"Redis did not take the usage batch: {exc}") from None
        return counted

    async def _run_script(self, keys: list[str], arguments: list[Any]) -> Any:
        if self._lean is None:
            return await self._script(keys=keys, args=arguments)
        parts: tuple[Any, ...] = ("EVALSHA", self._sha, len(keys), *keys, *arguments)
        command = hiredis.pack_command(parts)
        reply = await self._lean.call(command)
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            load: tuple[Any, ...] = ("SCRIPT", "LOAD", self._script_text)
            await self._lean.call(hiredis.pack_command(load))
            reply = await self._lean.call(command)
        if isinstance(reply, hiredis.ReplyError):
            raise StorageUnavailable(f"Redis refused the usage batch: {reply}")
        return reply

    async def usage(self, tenant: str, period: str) -> TenantUsage:
        try:
            raw = await self._client.hgetall(usage_key(tenant, period))
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StorageUnavailable(f"Redis did not answer: {exc}") from None
        return tenant_usage(tenant, period, {name.decode(): int(value) for name, value in raw.items()})

    async def ledger(self, tenant: str, since: float, until: float) -> list[UsageRecord]:
        # Stream ids are insertion times, never earlier than a record's own time: start there.
        try:
            entries = await self._client.xrange(ledger_key(tenant), min=f"{int(since * 1000)}-0", max="+")
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StorageUnavailable(f"Redis did not answer: {exc}") from None
        records = [record_from_json(fields[b"record"]) for _, fields in entries]
        return [record for record in records if since <= record.time < until]

    async def admit(self, admissions: Sequence[Admission]) -> None:
        try:
            by_tenant: dict[str, list[Admission]] = {}
            for admission in admissions:
                by_tenant.setdefault(admission.tenant, []).append(admission)
            # Two commands per tenant and flush, not per admission: the flush carries a
            # second's worth of requests.
            async with self._client.pipeline(transaction=False) as pipe:
                for tenant, batch in by_tenant.items():
                    pipe.hset(
                        admissions_key(tenant), mapping={a.request_id: json.dumps(asdict(a)) for a in batch}
                    )
                    pipe.zadd(pending_key(tenant), {a.request_id: a.time for a in batch})
                pipe.sadd(PENDING_TENANTS_KEY, *by_tenant)
                await pipe.execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StorageUnavailable(f"Redis did not take the admissions: {exc}") from None

    async def overdue(self, before: float, limit: int = 1000) -> list[Admission]:
        found: list[Admission] = []
        try:
            for raw in await self._client.smembers(PENDING_TENANTS_KEY):
                tenant = raw.decode()
                ids = await self._client.zrangebyscore(
                    pending_key(tenant), "-inf", f"({before}", start=0, num=limit
                )
                if not ids and not await self._client.zcard(pending_key(tenant)):
                    await self._client.srem(PENDING_TENANTS_KEY, tenant)
                    continue
                texts = await self._client.hmget(admissions_key(tenant), ids) if ids else []
                found += [Admission(**json.loads(text)) for text in texts if text is not None]
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StorageUnavailable(f"Redis did not answer: {exc}") from None
        return sorted(found, key=lambda admission: admission.time)[:limit]

    async def close(self) -> None:
        if self._lean is not None:
            await self._lean.close()
        await self._client.aclose()
        for sentinel in self._sentinels:
            await sentinel.aclose()


def record_from_json(text: bytes | str) -> UsageRecord:
    document = json.loads(text)
    document.pop("status_class", None)
    return UsageRecord(**document)


def _record_keys(record: UsageRecord) -> list[str]:
    month, day, hour = record.periods()
    tenant = record.tenant
    return [
        seen_key(tenant, record.request_id),
        usage_key(tenant, month),
        usage_key(tenant, day),
        usage_key(tenant, hour),
    ]


def open_usage_store(
    url: str | None, *, ledger_retention_seconds: float = DEFAULT_LEDGER_RETENTION_SECONDS
) -> UsageStore:
    if url is None:
        return MemoryUsageStore(ledger_retention_seconds=ledger_retention_seconds)
    return RedisUsageStore(url, ledger_retention_seconds=ledger_retention_seconds)
