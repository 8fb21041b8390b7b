"""One contract for both usage stores: every request counted once, by route, status class
and period, however often its record arrives."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import fields as fields_of
from datetime import UTC, datetime
from typing import cast

import orjson
import pytest
import redis.asyncio

from meshtoll.keys import admissions_key, admitted_tenants_key, ledger_key, pending_key
from meshtoll.storage import MemoryUsageStore
from meshtoll.storage.usage_redis import (
    ADMITTED_TENANTS_BUCKET_SECONDS,
    LEDGER_FIELDS,
    MAX_RECORDS_PER_CALL,
    RedisUsageStore,
)
from meshtoll.usage.ledger import LEDGER_START, position_before, position_key
from meshtoll.usage.records import Admission, Source, UsageRecord
from meshtoll.usage.store import UsageStore

T = datetime(2026, 11, 30, 23, 30, tzinfo=UTC).timestamp()
_tenants = itertools.count()


def record(
    tenant: str,
    request_id: str,
    *,
    route: str = "search",
    status: int = 200,
    units: int = 5,
    at: float = T,
    source: Source = "access_log",
) -> UsageRecord:
    return UsageRecord(
        request_id, at, tenant, "ci", "pro", route, "GET", status, 100, 2000, 3.5, units, source
    )


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[tuple[RedisUsageStore, redis.asyncio.Redis]]:
    """A Redis usage store and a plain client beside it, to plant what earlier versions wrote."""
    store = RedisUsageStore(redis_url)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        yield store, client
    finally:
        await client.aclose()
        await store.close()


async def test_records_count_by_route_status_and_period(usage_store: UsageStore) -> None:
    tenant = f"usage{next(_tenants)}"
    batch = [
        record(tenant, "r1"),
        record(tenant, "r2", status=429, units=0),
        record(tenant, "r3", route="export", units=1),
        record(tenant, "r4", at=T + 3600),  # the next day and month: 2026-12-01 00:30
    ]
    assert await usage_store.record(batch) == 4
    november = await usage_store.usage(tenant, "2026-11")
    assert (november.requests, november.units) == (3, 6)
    assert [(r.route, r.requests, r.units) for r in november.by_route] == [("export", 1, 1), ("search", 2, 5)]
    assert november.by_status == {"2xx": 2, "4xx": 1}
    assert (await usage_store.usage(tenant, "2026-12")).requests == 1
    assert (await usage_store.usage(tenant, "2026-11-30")).requests == 3
    assert (await usage_store.usage(tenant, "2026-11-30T23")).requests == 3
    assert (await usage_store.usage(tenant, "2026-10")).requests == 0


async def test_statuses_of_one_class_and_records_of_interleaved_hours_add_up(usage_store: UsageStore) -> None:
    # The Redis store sums a batch by status and hour before it names their class and hash.
    tenant = f"usage{next(_tenants)}"
    batch = [
        record(tenant, "a", status=200),
        record(tenant, "b", status=503, units=0, at=T + 3600),
        record(tenant, "c", status=201, units=2),
        record(tenant, "d", status=500, units=0),
        record(tenant, "e", status=204, units=1, at=T + 3600),
        record(tenant, "f", status=99, units=0),
    ]
    assert await usage_store.record(batch) == 6
    november = await usage_store.usage(tenant, "2026-11-30T23")
    assert (november.requests, november.units) == (4, 7)
    assert november.by_status == {"2xx": 2, "5xx": 1, "unknown": 1}
    december = await usage_store.usage(tenant, "2026-12-01T00")
    assert (december.requests, december.units) == (2, 1)
    assert december.by_status == {"2xx": 1, "5xx": 1}


async def test_a_replayed_or_duplicated_batch_never_counts_twice(usage_store: UsageStore) -> None:
    tenant = f"usage{next(_tenants)}"
    batch = [record(tenant, "a"), record(tenant, "b")]
    assert await usage_store.record(batch) == 2
    assert await usage_store.record([*batch, record(tenant, "a"), record(tenant, "c")]) == 1
    assert (await usage_store.usage(tenant, "2026-11")).requests == 3


async def test_a_request_id_twice_in_one_new_batch_counts_once(usage_store: UsageStore) -> None:
    tenant = f"usage{next(_tenants)}"
    assert (
        await usage_store.record([record(tenant, "twice"), record(tenant, "twice"), record(tenant, "once")])
        == 2
    )
    assert (await usage_store.usage(tenant, "2026-11")).requests == 2


async def test_a_late_access_log_record_in_another_hour_than_its_billed_admission_counts_once(
    usage_store: UsageStore,
) -> None:
    # authz's clock said 23:59:59.9, Envoy's start time says 00:00:00.1 of the next month.
    tenant = f"usage{next(_tenants)}"
    midnight = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    assert (
        await usage_store.record([record(tenant, "edge", status=0, source="admission", at=midnight - 0.1)])
        == 1
    )
    assert await usage_store.record([record(tenant, "edge", at=midnight + 0.1)]) == 0
    assert (await usage_store.usage(tenant, "2026-11")).requests == 1
    assert (await usage_store.usage(tenant, "2026-12")).requests == 0


async def test_batches_larger_than_one_script_call_count_every_record_once(usage_store: UsageStore) -> None:
    tenant = f"usage{next(_tenants)}"
    # Two and a half script calls' worth, spread over the turn of the month (T is 23:30).
    count = MAX_RECORDS_PER_CALL * 5 // 2
    step = 3600 / count
    batch = [record(tenant, f"big{n}", at=T + n * step) for n in range(count)]
    in_november = sum(1 for r in batch if r.time < T + 1800)
    assert await usage_store.record(batch) == count
    assert await usage_store.record(batch[::7]) == 0
    usage = await usage_store.usage(tenant, "2026-11")
    assert (usage.requests, usage.units) == (in_november, in_november * 5)
    assert (await usage_store.usage(tenant, "2026-12")).requests == count - in_november


@pytest.mark.integration
async def test_a_replay_days_later_is_still_recognised(redis_url: str) -> None:
    tenant = f"usage{next(_tenants)}"
    now = [T]
    store = RedisUsageStore(redis_url, clock=lambda: now[0])
    try:
        assert await store.record([record(tenant, "kept")]) == 1
        now[0] += 6.9 * 86400
        assert await store.record([record(tenant, "kept"), record(tenant, "fresh")]) == 1
    finally:
        await store.close()


async def test_admissions_billed_without_an_access_log_are_marked_unreconciled(
    usage_store: UsageStore,
) -> None:
    tenant = f"usage{next(_tenants)}"
    await usage_store.record([record(tenant, "x", status=0, source="admission")])
    usage = await usage_store.usage(tenant, "2026-11")
    assert (usage.requests, usage.unreconciled, usage.by_status) == (1, 1, {"unknown": 1})


@pytest.mark.integration
async def test_the_redis_ledger_holds_each_record_once_and_keys_expire(redis_url: str) -> None:
    tenant = f"usage{next(_tenants)}"
    store = RedisUsageStore(redis_url)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await store.record([record(tenant, "l1"), record(tenant, "l2")])
        await store.record([record(tenant, "l1")])
        assert [r.request_id for r in await store.ledger(tenant, 0, T + 1)] == ["l1", "l2"]
        assert await client.xlen(ledger_key(tenant)) == 1  # one entry per batch; the replay adds none
        usage_hashes = await client.keys(f"meshtoll_{{{tenant}}}_usage_*")
        assert len(usage_hashes) == 3
        seen_sets = await client.keys(f"meshtoll_{{{tenant}}}_seen_*")
        assert len(seen_sets) == 1
        assert all([await client.ttl(name) > 0 for name in [*usage_hashes, *seen_sets, ledger_key(tenant)]])
    finally:
        await store.close()
        await client.aclose()


@pytest.mark.integration
async def test_the_ledger_keeps_records_for_the_configured_retention(redis_url: str) -> None:
    tenant = f"usage{next(_tenants)}"
    now = [time.time()]
    store = RedisUsageStore(redis_url, ledger_retention_seconds=1.0, clock=lambda: now[0])
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await store.record([record(tenant, "old")])
        ((entry, _),) = cast(list[tuple[bytes, object]], await client.xrange(ledger_key(tenant)))
        old_ms = int(entry.split(b"-")[0])  # Redis stamps each entry with its own clock
        # The store's clock a retention past the old entry, so that it is the one to go...
        now[0] = (old_ms + 1) / 1000 + 1.0
        # ...and the new entry, stamped by Redis, must come after that: Redis's clock first
        # moves past the old entry's millisecond.
        deadline = time.monotonic() + 5
        while (await redis_ms(client)) <= old_ms + 1:
            assert time.monotonic() < deadline, "Redis's clock did not move"
        await store.record([record(tenant, "new")])
        assert [r.request_id for r in await store.ledger(tenant, 0, T + 1)] == ["new"]
        assert await client.xlen(ledger_key(tenant)) == 1
    finally:
        await store.close()
        await client.aclose()


async def redis_ms(client: redis.asyncio.Redis) -> int:
    seconds, microseconds = await client.time()
    return int(seconds) * 1000 + int(microseconds) // 1000


async def test_the_memory_ledger_drops_records_past_the_retention() -> None:
    now = [T]
    store = MemoryUsageStore(ledger_retention_seconds=3600, clock=lambda: now[0])
    await store.record([record("mem", "old", at=T - 1800), record("mem", "new", at=T)])
    assert [found.request_id for found in await store.ledger("mem", 0, T + 1)] == ["old", "new"]
    now[0] = T + 1801  # the store's clock, not the machine's, says when a record is past it
    await store.record([record("mem", "later", at=T + 1801)])
    assert [found.request_id for found in await store.ledger("mem", 0, T + 2000)] == ["new", "later"]


def admission(tenant: str, request_id: str) -> Admission:
    return Admission(request_id, T, tenant, "ci", "pro", "search", "GET", 5)


async def test_the_request_id_of_a_pending_admission_names_its_tenant(usage_store: UsageStore) -> None:
    first, second = f"usage{next(_tenants)}", f"usage{next(_tenants)}"
    await usage_store.admit([admission(first, f"{first}-a"), admission(second, f"{second}-b")])
    await usage_store.admit([admission(first, f"{first}-c")])
    ids = [f"{first}-a", f"{second}-b", f"{first}-c", f"{first}-never"]
    assert await usage_store.admitted_tenants(ids) == {ids[0]: first, ids[1]: second, ids[2]: first}
    assert await usage_store.admitted_tenants([]) == {}


@pytest.mark.integration
async def test_the_redis_index_of_admitted_tenants_is_read_for_a_bucket_more_and_then_expires(
    redis_url: str,
) -> None:
    tenant = f"usage{next(_tenants)}"
    bucket = ADMITTED_TENANTS_BUCKET_SECONDS
    start = T - T % bucket + bucket - 0.01  # the last moment of a bucket
    now = [start]
    store = RedisUsageStore(redis_url, clock=lambda: now[0])
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await store.admit([admission(tenant, f"{tenant}-x")])
        index = admitted_tenants_key(int(start // bucket))
        assert await client.hget(index, f"{tenant}-x") == tenant.encode()
        assert await client.ttl(index) > 0
        now[0] = start + bucket  # the next bucket but one begins 0.01 s later
        assert await store.admitted_tenants([f"{tenant}-x"]) == {f"{tenant}-x": tenant}
        now[0] = start + 0.02 + bucket  # no reader looks there any more
        assert await store.admitted_tenants([f"{tenant}-x"]) == {}
    finally:
        await store.close()
        await client.aclose()


async def test_the_ledger_reads_in_append_order_so_a_record_billed_late_comes_after_later_ones(
    usage_store: UsageStore,
) -> None:
    # Reconciliation bills an admission with the admission's own time, after records of
    # later requests were written: by time it sorts first, by append order last.
    tenant = f"usage{next(_tenants)}"
    assert await usage_store.record([record(tenant, "a", at=T + 10), record(tenant, "b", at=T + 11)]) == 2
    late = record(tenant, "late", at=T + 1, status=0, source="admission")
    assert await usage_store.record([late]) == 1
    assert await usage_store.record([record(tenant, "c", at=T + 12)]) == 1
    entries = await usage_store.ledger_after(tenant, LEDGER_START, 10)
    assert [[r.request_id for r in entry.records] for entry in entries] == [["a", "b"], ["late"], ["c"]]
    assert [entry.last for entry in entries] == [2, 3, 4]
    assert [entries[0].number_of(0), entries[0].number_of(1), entries[1].number_of(0)] == [1, 2, 3]
    assert [position_key(entry.position) for entry in entries] == sorted(
        position_key(entry.position) for entry in entries
    )
    # A reader resumes after the position it has read, whatever the records' times.
    after_first = await usage_store.ledger_after(tenant, entries[0].position, 1)
    assert [r.request_id for entry in after_first for r in entry.records] == ["late"]
    assert await usage_store.ledger_after(tenant, entries[-1].position, 10) == []
    assert await usage_store.ledger_appended([tenant, "nobody"]) == {tenant: 4, "nobody": 0}


async def test_a_replayed_record_appends_nothing_to_the_ledger(usage_store: UsageStore) -> None:
    tenant = f"usage{next(_tenants)}"
    assert await usage_store.record([record(tenant, "once")]) == 1
    assert await usage_store.record([record(tenant, "once"), record(tenant, "new")]) == 1
    entries = await usage_store.ledger_after(tenant, LEDGER_START, 10)
    assert [[r.request_id for r in entry.records] for entry in entries] == [["once"], ["new"]]
    assert await usage_store.ledger_appended([tenant]) == {tenant: 2}


async def test_a_position_before_a_moment_starts_a_reader_at_what_was_appended_since(
    usage_store: UsageStore,
) -> None:
    tenant = f"usage{next(_tenants)}"
    assert await usage_store.record([record(tenant, "old")]) == 1
    (entry,) = await usage_store.ledger_after(tenant, LEDGER_START, 10)
    assert await usage_store.ledger_after(tenant, position_before(entry.appended), 10) == [entry]
    assert await usage_store.ledger_after(tenant, position_before(entry.appended + 0.001), 10) == []


@pytest.mark.integration
async def test_a_pending_admission_reads_back_with_every_field_also_as_an_earlier_version_wrote_it(
    redis_store: tuple[RedisUsageStore, redis.asyncio.Redis],
) -> None:
    store, client = redis_store
    tenant = f"usage{next(_tenants)}"
    admitted = Admission("r-new", T, tenant, "consumer-1", "pro", "chat", "POST", 7, awaits_report=True)
    await store.admit([admitted])
    # An object with the field names: what versions before the JSON array stored.
    earlier = Admission("r-old", T + 1, tenant, "consumer-2", "free", "v1", "GET", 3)
    await client.hset(admissions_key(tenant), "r-old", orjson.dumps(earlier))
    found = await store.pending([(tenant, "r-new"), (tenant, "r-old")])
    assert found == {(tenant, "r-new"): (admitted, None), (tenant, "r-old"): (earlier, None)}


@pytest.mark.integration
async def test_an_overdue_id_whose_admission_is_gone_leaves_the_pending_set_and_the_others_stay(
    redis_store: tuple[RedisUsageStore, redis.asyncio.Redis],
) -> None:
    store, client = redis_store
    tenant = f"usage{next(_tenants)}"
    kept = Admission("r-kept", T, tenant, "ci", "pro", "search", "GET", 5)
    await store.admit([kept, Admission("r-gone", T, tenant, "ci", "pro", "search", "GET", 5)])
    # Settled between overdue's read of the pending set and its read of the admissions.
    await client.hdel(admissions_key(tenant), "r-gone")
    assert [a for a in await store.overdue(T + 60) if a.tenant == tenant] == [kept]
    assert await client.zrange(pending_key(tenant), 0, -1) == [b"r-kept"]
    # With nothing gone, nothing leaves: reading is not settling.
    assert [a for a in await store.overdue(T + 60) if a.tenant == tenant] == [kept]
    assert await client.zrange(pending_key(tenant), 0, -1) == [b"r-kept"]


@pytest.mark.integration
async def test_ledger_records_read_back_with_every_field_also_as_an_earlier_version_wrote_them(
    redis_store: tuple[RedisUsageStore, redis.asyncio.Redis],
) -> None:
    store, client = redis_store
    tenant = f"usage{next(_tenants)}"
    # Objects with the field names (and the derived status_class): what versions before
    # the JSON arrays appended.
    earlier = record(tenant, "r-old", route="v1", status=404, units=0, source="admission")
    await client.xadd(ledger_key(tenant), {"records": orjson.dumps([earlier.as_document()]), "last": 1})
    written = record(tenant, "r-new", status=201, at=T + 1)
    await store.record([written])
    assert await store.ledger(tenant, 0, T + 2) == [earlier, written]
    (_, fields), _ = cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(ledger_key(tenant)))
    assert b"status_class" in fields[b"records"]
    entries = await store.ledger_after(tenant, LEDGER_START, 10)
    assert [entry.records for entry in entries] == [(earlier,), (written,)]


def test_a_ledger_records_array_is_usage_records_fields_in_a_stored_order() -> None:
    # A stored format (entries live 400 days): this literal changes only on purpose, with a
    # reader for what was written before.
    assert LEDGER_FIELDS == (
        "request_id", "time", "tenant", "consumer", "plan", "route", "method", "status",
        "request_bytes", "response_bytes", "duration_ms", "units", "source",
    )  # fmt: skip
    # Read back by position: UsageRecord's own order must be the stored one.
    assert tuple(field.name for field in fields_of(UsageRecord)) == LEDGER_FIELDS
