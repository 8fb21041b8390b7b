"""The usage store: counters per tenant / route / status class / period, and a ledger of
every record, each request counted once however often its record arrives.

Counters live in one hash per tenant and period (month, day, hour), keyed with the
tenant's hash tag so that one tenant's batch is one Lua call on one Cluster shard.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, Protocol

import hiredis
import orjson
import redis.asyncio
import redis.exceptions

from meshtoll.errors import StorageUnavailable
from meshtoll.meter.records import Admission, Source, UsageRecord, counter_increments, periods_of_hour
from meshtoll.storage.redis import redis_py_client
from meshtoll.storage.resp import LeanRedis
from meshtoll.storage.urls import parse_redis_url

# A replayed record is recognised for at least a week: the ids counted in each week are
# kept in one set, and a batch looks in this week's and last week's.
WEEK_SECONDS = 7 * 86400
SEEN_SET_SECONDS = 2 * WEEK_SECONDS + 86400
# Records per usage.lua call: Lua's unpack() takes about 8,000 values, and one call of this
# size keeps Redis busy well under a millisecond.
MAX_RECORDS_PER_CALL = 1000
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


def seen_key(tenant: str, week: int) -> str:
    """The set of request ids counted in one week (counted from the epoch): where replays
    are found."""
    return f"meshtoll_{{{tenant}}}_seen_w{week}"


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
                increments = counter_increments(
                    record.route, record.status_class, record.source, 1, record.units
                )
                for name, amount in increments:
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
        by_tenant: dict[str, dict[str, UsageRecord]] = {}
        for record in records:  # the first of several with one request id stands for all
            by_tenant.setdefault(record.tenant, {}).setdefault(record.request_id, record)
        now = self._clock()
        counted = 0
        try:
            for tenant, unique in by_tenant.items():
                batch = list(unique.values())
                for start in range(0, len(batch), MAX_RECORDS_PER_CALL):
                    chunk = batch[start : start + MAX_RECORDS_PER_CALL]
                    counted += await self._record_new(tenant, chunk, now)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StorageUnavailable(f"Redis did not take the usage batch: {exc}") from None
        return counted

    async def _record_new(self, tenant: str, batch: list[UsageRecord], now: float) -> int:
        """Count the records of `batch` that were not counted before. usage.lua writes only
        when all are new, and otherwise names the others: they are dropped and the rest sent
        again (each round drops at least one, so this ends)."""
        while batch:
            keys, arguments = usage_script_call(tenant, batch, now, self._ledger_retention)
            counted, known = await self._run_script(keys, arguments)
            if not known:
                return int(counted)
            dropped = {int(index) - 1 for index in known}
            batch = [record for index, record in enumerate(batch) if index not in dropped]
        return 0

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
        records = [record for _, fields in entries for record in ledger_entry_records(fields)]
        return sorted((r for r in records if since <= r.time < until), key=lambda r: r.time)

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
                await pipe.execute()
            # Only once the admissions are in: `overdue` drops a tenant whose pending set it
            # finds empty, and must not find it empty after this.
            await self._client.sadd(PENDING_TENANTS_KEY, *by_tenant)
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
                    # An admission flushed since the count puts the tenant back itself only
                    # if its SADD came after the SREM: look once more.
                    if await self._client.zcard(pending_key(tenant)):
                        await self._client.sadd(PENDING_TENANTS_KEY, tenant)
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


def ledger_entry_records(fields: dict[bytes, bytes]) -> list[UsageRecord]:
    """The records of one ledger stream entry: one batch's new records, a JSON array."""
    return [UsageRecord.from_document(document) for document in orjson.loads(fields[b"records"])]


def usage_script_call(
    tenant: str, batch: Sequence[UsageRecord], now: float, ledger_retention_seconds: float
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of usage.lua for one tenant's records, request ids all distinct,
    counted as if all were new (see the script for the layout)."""
    this_week = int(now // WEEK_SECONDS)
    keys = [admissions_key(tenant), pending_key(tenant), ledger_key(tenant)]
    keys += (seen_key(tenant, this_week), seen_key(tenant, this_week - 1))
    groups: dict[int, int] = {}  # hour since the epoch -> hour group (1-based)
    # (group, route, status class, source) -> [requests, units]: a batch's records share
    # a handful of these, so the counter fields are spelled out once per kind, not per record.
    kinds: dict[tuple[int, str, str, Source], list[int]] = {}
    for record in batch:
        hour = int(record.time // 3600)
        group = groups.get(hour)
        if group is None:
            group = groups[hour] = len(groups) + 1
            keys += (usage_key(tenant, period) for period in periods_of_hour(hour))
        kind = (group, record.route, record.status_class, record.source)
        sums = kinds.get(kind)
        if sums is None:
            kinds[kind] = [1, record.units]
        else:
            sums[0] += 1
            sums[1] += record.units
    amounts: dict[tuple[int, str], int] = {}
    for (group, route, status_class, source), (requests, units) in kinds.items():
        for name, amount in counter_increments(route, status_class, source, requests, units):
            amounts[group, name] = amounts.get((group, name), 0) + amount
    ledger_entry = orjson.dumps([record.as_document() for record in batch])
    # Ledger ids are insertion times in ms: entries older than the retention are trimmed.
    oldest_id = max(0, int((now - ledger_retention_seconds) * 1000))
    arguments: list[Any] = [SEEN_SET_SECONDS, oldest_id, *RETENTION_SECONDS.values()]
    arguments += (max(1, math.ceil(ledger_retention_seconds)), ledger_entry, len(amounts))
    for (group, name), amount in amounts.items():
        arguments += (group, name, amount)
    arguments += (record.request_id for record in batch)
    return keys, arguments


def open_usage_store(
    url: str | None, *, ledger_retention_seconds: float = DEFAULT_LEDGER_RETENTION_SECONDS
) -> UsageStore:
    if url is None:
        return MemoryUsageStore(ledger_retention_seconds=ledger_retention_seconds)
    return RedisUsageStore(url, ledger_retention_seconds=ledger_retention_seconds)
