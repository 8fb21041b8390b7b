"""The usage store on Redis (standalone, Sentinel or Cluster): one Lua call per tenant and
batch (storage/lua/usage.lua), through the pipelining client on standalone Redis."""

from __future__ import annotations

import asyncio
import math
import operator
import time
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any

import hiredis
import orjson

from meshtoll.errors import StorageRefused
from meshtoll.keys import (
    PENDING_TENANTS_KEY,
    USAGE_TENANTS_KEY,
    admissions_key,
    admitted_tenants_key,
    ledger_appended_key,
    ledger_key,
    pending_key,
    reported_units_key,
    seen_key,
    usage_key,
)
from meshtoll.storage.redis_access import LeanScript, RedisFailures, lean_client, lua_script, redis_py_client
from meshtoll.storage.resp import LeanRedis
from meshtoll.storage.urls import parse_redis_url
from meshtoll.usage.ledger import LedgerEntry, LedgerPosition
from meshtoll.usage.records import (
    Admission,
    ReportedUnits,
    Source,
    UsageRecord,
    periods_of_hour,
    status_class,
    with_reported_units,
)
from meshtoll.usage.store import ADMITTED_TENANTS_SECONDS, DEFAULT_LEDGER_RETENTION_SECONDS, PendingAdmissions
from meshtoll.usage.tallies import TenantUsage, counter_increments, tenant_usage

# A replayed record is recognised for at least a week: the ids counted in each week are
# kept in one set, and a batch looks in this week's and last week's.
WEEK_SECONDS = 7 * 86400
SEEN_SET_SECONDS = 2 * WEEK_SECONDS + 86400
REPORTED_UNITS_SECONDS = 2 * 86400
# Records per usage.lua call. The script costs Redis about 4 µs a record (measured with
# 50-record batches), and rate-limit decisions on the same Redis wait while it runs: 250
# keeps that wait near a millisecond. (Lua's unpack() would take up to about 8,000.)
MAX_RECORDS_PER_CALL = 250
# The request id -> tenant index is one hash per bucket of this many seconds (by the
# clock of the process that stores the admission), read in the current and the previous
# bucket: an id is found at least this long after its admission was stored.
ADMITTED_TENANTS_BUCKET_SECONDS = int(ADMITTED_TENANTS_SECONDS)
RETENTION_SECONDS = {"month": 3 * 366 * 86400, "day": 400 * 86400, "hour": 8 * 86400}
_NO_ANSWER = RedisFailures("Redis did not answer")
_BATCH_NOT_TAKEN = RedisFailures("Redis did not take the usage batch")
_ADMISSIONS_NOT_TAKEN = RedisFailures("Redis did not take the admissions")
_UNITS_NOT_TAKEN = RedisFailures("Redis did not take the reported units")


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
        text = lua_script("usage.lua")
        self._script = self._client.register_script(text)
        # Standalone Redis: usage batches go through the pipelining client, whose C packing
        # costs a twentieth of redis-py's per argument (a batch brings one per record, its
        # request id). A batch may be resent safely: records are counted once by request id.
        self._lean: LeanRedis | None = None
        if target.topology == "standalone":
            self._lean = lean_client(target, timeout_ms / 1000)
            self._lean_script = LeanScript(text, "the usage batch")

    async def record(self, records: Sequence[UsageRecord]) -> int:
        by_tenant: dict[str, dict[str, UsageRecord]] = {}
        for record in records:  # the first of several with one request id stands for all
            unique = by_tenant.get(record.tenant)
            if unique is None:  # not setdefault(tenant, {}): that builds a dict per record
                unique = by_tenant[record.tenant] = {}
            unique.setdefault(record.request_id, record)
        now = self._clock()
        counted = 0
        if not by_tenant:
            return 0
        with _BATCH_NOT_TAKEN:
            # Indexed before its records are written: a tenant is never missing from exports,
            # at worst listed with nothing in a period. Through the pipelining client where it
            # serves: redis-py's call was most of a small batch's cost (Envoy sends one every
            # half second whatever the traffic).
            await self._pipeline([("SADD", USAGE_TENANTS_KEY, *by_tenant)])
            for tenant, unique in by_tenant.items():
                batch = list(unique.values())
                for start in range(0, len(batch), MAX_RECORDS_PER_CALL):
                    chunk = batch[start : start + MAX_RECORDS_PER_CALL]
                    counted += await self._record_new(tenant, chunk, now)
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
        parts: tuple[Any, ...] = ("EVALSHA", self._lean_script.sha, len(keys), *keys, *arguments)
        return await self._lean_script.call(self._lean, hiredis.pack_command(parts))

    async def usage(self, tenant: str, period: str) -> TenantUsage:
        with _NO_ANSWER:
            raw = await self._client.hgetall(usage_key(tenant, period))
        return tenant_usage(tenant, period, {name.decode(): int(value) for name, value in raw.items()})

    async def ledger(self, tenant: str, since: float, until: float) -> list[UsageRecord]:
        # Stream ids are insertion times, never earlier than a record's own time: start there.
        with _NO_ANSWER:
            entries = await self._client.xrange(ledger_key(tenant), min=f"{int(since * 1000)}-0", max="+")
        records = [record for _, fields in entries for record in ledger_entry_records(fields)]
        return sorted((r for r in records if since <= r.time < until), key=lambda r: r.time)

    async def ledger_after(self, tenant: str, after: LedgerPosition, limit: int) -> list[LedgerEntry]:
        with _NO_ANSWER:
            entries = await self._client.xrange(ledger_key(tenant), min=f"({after}", max="+", count=limit)
        return [ledger_entry(position.decode(), fields) for position, fields in entries]

    async def ledger_appended(self, tenants: Sequence[str]) -> dict[str, int]:
        if not tenants:
            return {}
        with _NO_ANSWER:
            async with self._client.pipeline(transaction=False) as pipe:
                for tenant in tenants:
                    pipe.get(ledger_appended_key(tenant))
                counts = await pipe.execute()
        return {tenant: int(count or 0) for tenant, count in zip(tenants, counts, strict=True)}

    async def admit(self, admissions: Sequence[Admission]) -> None:
        if not admissions:
            return
        by_tenant: dict[str, list[Admission]] = {}
        for admission in admissions:
            by_tenant.setdefault(admission.tenant, []).append(admission)
        # Two commands per tenant and flush, not per admission: the flush carries a
        # second's worth of requests.
        commands: list[tuple[Any, ...]] = []
        for tenant, batch in by_tenant.items():
            documents = chain.from_iterable((a.request_id, admission_document(a)) for a in batch)
            commands.append(("HSET", admissions_key(tenant), *documents))
            due = chain.from_iterable((a.due(), a.request_id) for a in batch)
            commands.append(("ZADD", pending_key(tenant), *due))
        # The request id -> tenant index, in the same round trip. An entry that finds the
        # tenant here before the admission is in (another shard) waits for it like any entry.
        now = self._clock()
        bucket = int(now // ADMITTED_TENANTS_BUCKET_SECONDS)
        index = admitted_tenants_key(bucket)
        commands.append(("HSET", index, *chain.from_iterable((a.request_id, a.tenant) for a in admissions)))
        # Gone a bucket after its last reader (the bucket after next), against clock skew.
        commands.append(("EXPIRE", index, math.ceil((bucket + 3) * ADMITTED_TENANTS_BUCKET_SECONDS - now)))
        with _ADMISSIONS_NOT_TAKEN:
            await self._pipeline(commands)
            # Only once the admissions are in: `overdue` drops a tenant whose pending set it
            # finds empty, and must not find it empty after this.
            await self._pipeline([("SADD", PENDING_TENANTS_KEY, *by_tenant)])

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """`commands` in one round trip; through the pipelining client on a standalone Redis,
        where hiredis packs them in C (redis-py's packing was most of an admission flush)."""
        if self._lean is None:
            async with self._client.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                replies: list[Any] = await pipe.execute()
                return replies
        lean = self._lean
        # Every call ends before this returns or raises: a failed one must not leave the
        # others running on, past the caller (and past the event loop's end).
        replies = await asyncio.gather(
            *(lean.call(hiredis.pack_command(command)) for command in commands), return_exceptions=True
        )
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(reply, hiredis.ReplyError):  # an error reply is a value, not raised
                raise StorageRefused(f"Redis refused {command[0]}: {reply}")
            if isinstance(reply, BaseException):
                raise reply
        return replies

    async def report_units(self, reports: Sequence[ReportedUnits]) -> None:
        by_tenant: dict[str, dict[str, int]] = {}
        for report in reports:
            by_tenant.setdefault(report.tenant, {})[report.request_id] = report.units
        now = self._clock()
        with _UNITS_NOT_TAKEN:
            async with self._client.pipeline(transaction=False) as pipe:
                for tenant, units in by_tenant.items():
                    pipe.hset(reported_units_key(tenant), mapping=units)
                    # Settled reports leave with their record; the rest (a report of a
                    # request already billed) must not stay forever.
                    pipe.expire(reported_units_key(tenant), REPORTED_UNITS_SECONDS)
                    # The stream has ended: its admission is due the ordinary grace from now,
                    # no longer after the streaming grace (XX: only a pending one; LT: never
                    # later than it was).
                    pipe.zadd(pending_key(tenant), dict.fromkeys(units, now), xx=True, lt=True)
                await pipe.execute()

    async def overdue(self, before: float, limit: int = 1000) -> list[Admission]:
        with _NO_ANSWER:
            tenants = [raw.decode() for raw in await self._client.smembers(PENDING_TENANTS_KEY)]
            # Each tenant's share of `limit` (at least 100), so that the work of a call is
            # bounded however many tenants wait, and two round trips whatever their number:
            # reconciliation must keep up with every admission authz makes.
            share = max(100, limit // max(1, len(tenants)))
            async with self._client.pipeline(transaction=False) as pipe:
                for tenant in tenants:
                    pipe.zrangebyscore(pending_key(tenant), "-inf", f"({before}", start=0, num=share)
                    pipe.zcard(pending_key(tenant))
                replies = await pipe.execute()
            due: list[tuple[str, list[bytes]]] = []
            for tenant, ids, size in zip(tenants, replies[::2], replies[1::2], strict=True):
                if not size:
                    await self._forget_pending_tenant(tenant)
                elif ids:
                    due.append((tenant, ids))
            found = await self._pending_admissions(due)
            # Each id read names one admission: as many found as asked, none is gone. The
            # usual case, and then no id is decoded and looked up again.
            if len(found) < sum(len(ids) for _, ids in due):
                await self._drop_orphans(due, found)
        overdue = [
            admission if units is None else with_reported_units(admission, units)
            for admission, units in found.values()
        ]
        overdue.sort(key=_admission_time)
        return overdue

    async def _drop_orphans(self, due: list[tuple[str, list[bytes]]], found: PendingAdmissions) -> None:
        """Pending ids whose admission is gone (settled since the read): out of the pending
        set, so that they never take up a tenant's share again."""
        async with self._client.pipeline(transaction=False) as pipe:
            for tenant, ids in due:
                orphans = [raw for raw in ids if (tenant, raw.decode()) not in found]
                if orphans:
                    pipe.zrem(pending_key(tenant), *orphans)
            await pipe.execute()

    async def _forget_pending_tenant(self, tenant: str) -> None:
        await self._client.srem(PENDING_TENANTS_KEY, tenant)
        # An admission flushed since the count puts the tenant back itself only if its SADD
        # came after the SREM: look once more.
        if await self._client.zcard(pending_key(tenant)):
            await self._client.sadd(PENDING_TENANTS_KEY, tenant)

    async def _pending_admissions(
        self, requests: Sequence[tuple[str, Sequence[str | bytes]]]
    ) -> PendingAdmissions:
        """The admissions and reported units of each tenant's request ids, in one round trip
        (packed by hiredis on a standalone Redis: the meter asks this for every access-log
        entry, and redis-py's packing of two arguments per entry was a third of its cost)."""
        if not requests:
            return {}
        commands: list[tuple[Any, ...]] = []
        for tenant, ids in requests:
            commands.append(("HMGET", admissions_key(tenant), *ids))
            commands.append(("HMGET", reported_units_key(tenant), *ids))
        replies = await self._pipeline(commands)
        found: PendingAdmissions = {}
        for (tenant, _), texts, reported in zip(requests, replies[::2], replies[1::2], strict=True):
            for text, units in zip(texts, reported, strict=True):
                if text is not None:
                    admission = admission_from_document(text)
                    found[tenant, admission.request_id] = (admission, None if units is None else int(units))
        return found

    async def pending(self, requests: Sequence[tuple[str, str]]) -> PendingAdmissions:
        by_tenant: dict[str, list[str]] = {}
        for tenant, request_id in requests:
            by_tenant.setdefault(tenant, []).append(request_id)
        with _NO_ANSWER:
            return await self._pending_admissions(list(by_tenant.items()))

    async def admitted_tenants(self, request_ids: Sequence[str]) -> dict[str, str]:
        if not request_ids:
            return {}
        bucket = int(self._clock() // ADMITTED_TENANTS_BUCKET_SECONDS)
        with _NO_ANSWER:
            now, before = await self._pipeline(
                [
                    ("HMGET", admitted_tenants_key(bucket), *request_ids),
                    ("HMGET", admitted_tenants_key(bucket - 1), *request_ids),
                ]
            )
        return {
            request_id: (tenant or earlier).decode()
            for request_id, tenant, earlier in zip(request_ids, now, before, strict=True)
            if tenant or earlier
        }

    async def backlog(self) -> int:
        with _NO_ANSWER:
            tenants = await self._client.smembers(PENDING_TENANTS_KEY)
            async with self._client.pipeline(transaction=False) as pipe:
                for raw in tenants:
                    pipe.zcard(pending_key(raw.decode()))
                return sum(await pipe.execute())

    async def tenants(self) -> list[str]:
        with _NO_ANSWER:
            return sorted(raw.decode() for raw in await self._client.smembers(USAGE_TENANTS_KEY))

    async def has_usage(self, tenant: str) -> bool:
        with _NO_ANSWER:
            return bool(await self._client.sismember(USAGE_TENANTS_KEY, tenant))

    async def close(self) -> None:
        if self._lean is not None:
            await self._lean.close()
        await self._client.aclose()
        for sentinel in self._sentinels:
            await sentinel.aclose()


_admission_time = operator.attrgetter("time")


def admission_document(admission: Admission) -> bytes:
    """How the admissions hash keeps an admission: its fields as a JSON array, in the
    dataclass's order. orjson writes a tuple in a quarter of the time it takes for the
    dataclass itself (an object with names), and the meter reads the array back in a third
    of the time (Admission(*fields) against Admission(**fields)): authz flushes one per
    admitted request and the meter reads one per access-log entry."""
    a = admission
    fields = (a.request_id, a.time, a.tenant, a.consumer, a.plan, a.route, a.method, a.units, a.awaits_report)
    return orjson.dumps(fields)


def admission_from_document(text: bytes) -> Admission:
    """An admission as admission_document wrote it, or as an object with the field names,
    as versions before it wrote them (admissions still pending across an upgrade)."""
    fields = orjson.loads(text)
    return Admission(*fields) if isinstance(fields, list) else Admission(**fields)


# A ledger record as a stored entry keeps it: an array of these fields in this order, which
# is UsageRecord's (status_class, derived, is not kept). Entries live for the ledger's
# retention (400 days by default), so the order is a stored format: tests pin it, and a
# change to it must go on reading what was written before.
LEDGER_FIELDS = (
    "request_id", "time", "tenant", "consumer", "plan", "route", "method", "status",
    "request_bytes", "response_bytes", "duration_ms", "units", "source",
)  # fmt: skip
# A record's array built in C: orjson writes a tuple in a fifth of the time it takes to
# build and write the record's object with names (2.1 µs against 9.5 a record on this
# host), and the meter writes one per metered request.
_ledger_fields_of = operator.attrgetter(*LEDGER_FIELDS)


def ledger_entry_document(batch: Sequence[UsageRecord]) -> bytes:
    """A ledger stream entry's records: a JSON array of them, each an array of its
    LEDGER_FIELDS."""
    return orjson.dumps([_ledger_fields_of(record) for record in batch])


def ledger_entry_records(fields: dict[bytes, bytes]) -> list[UsageRecord]:
    """The records of one ledger stream entry as ledger_entry_document wrote them, or as
    objects with the field names, as versions before it wrote them."""
    return [
        # By position: LEDGER_FIELDS is UsageRecord's own order (tests hold the two together).
        UsageRecord(*document) if isinstance(document, list) else UsageRecord.from_document(document)
        for document in orjson.loads(fields[b"records"])
    ]


def ledger_entry(position: str, fields: dict[bytes, bytes]) -> LedgerEntry:
    last = fields.get(b"last")
    return LedgerEntry(position, None if last is None else int(last), tuple(ledger_entry_records(fields)))


def usage_script_call(
    tenant: str, batch: Sequence[UsageRecord], now: float, ledger_retention_seconds: float
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of usage.lua for one tenant's records, request ids all distinct,
    counted as if all were new (see the script for the layout)."""
    this_week = int(now // WEEK_SECONDS)
    keys = [admissions_key(tenant), pending_key(tenant), ledger_key(tenant)]
    keys += (seen_key(tenant, this_week), seen_key(tenant, this_week - 1), reported_units_key(tenant))
    keys.append(ledger_appended_key(tenant))
    # (hour since the epoch, route, plan, status, source) -> [requests, units]: a batch's
    # records share a handful of these, so the counter fields are spelled out once per kind,
    # not per record. Keyed by the hour and the status themselves: their group and status
    # class are worked out once per kind below, not per record (a property call and a dict
    # lookup, 30% of this loop; the meter runs it for every metered request). Kinds keep the
    # order of their first record, so groups, keys and increments come in the order the
    # records name them, as when they were worked out per record.
    kinds: dict[tuple[float, str, str, int, Source], list[int]] = {}
    for record in batch:
        # The hour as the float floor division gives it: int() once per kind, not per record.
        kind = (record.time // 3600, record.route, record.plan, record.status, record.source)
        sums = kinds.get(kind)
        if sums is None:
            kinds[kind] = [1, record.units]
        else:
            sums[0] += 1
            sums[1] += record.units
    groups: dict[int, int] = {}  # hour since the epoch -> hour group (1-based)
    amounts: dict[tuple[int, str], int] = {}
    for (floor, route, plan, status, source), (requests, units) in kinds.items():
        hour = int(floor)
        group = groups.get(hour)
        if group is None:
            group = groups[hour] = len(groups) + 1
            keys += (usage_key(tenant, period) for period in periods_of_hour(hour))
        for name, amount in counter_increments(route, plan, status_class(status), source, requests, units):
            amounts[group, name] = amounts.get((group, name), 0) + amount
    ledger_entry = ledger_entry_document(batch)
    # Ledger ids are insertion times in ms: entries older than the retention are trimmed.
    oldest_id = max(0, int((now - ledger_retention_seconds) * 1000))
    arguments: list[Any] = [SEEN_SET_SECONDS, oldest_id, *RETENTION_SECONDS.values()]
    arguments += (max(1, math.ceil(ledger_retention_seconds)), ledger_entry, len(amounts))
    for (group, name), amount in amounts.items():
        arguments += (group, name, amount)
    arguments += (record.request_id for record in batch)
    return keys, arguments
