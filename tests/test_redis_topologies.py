"""The Redis store on a real 3-master Redis Cluster and behind a real Sentinel."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.crc import key_slot

from meshtoll.counting.limits import Check, RateLimit
from meshtoll.counting.periods import window
from meshtoll.ratelimit.limiter import Limiter
from meshtoll.storage.redis import RedisCounterStore
from meshtoll.storage.usage_redis import RedisUsageStore
from meshtoll.usage.records import UsageRecord
from tests.client import fetch
from tests.conftest import StartStack
from tests.redis_topologies import counters_in_slot, redis_cluster, redis_sentinel, slot_owner
from tests.waiting import wait_out_a_window_end

pytestmark = pytest.mark.integration

NOW = 1_795_000_000.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as ports:
        yield ports


def cluster_url(ports: list[int]) -> str:
    return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in ports)


async def test_tenant_counters_land_on_the_shard_of_their_hash_tag(cluster: list[int]) -> None:
    store = RedisCounterStore(cluster_url(cluster), timeout_ms=1000)
    try:
        owners = set()
        for tenant in ("acme", "globex", "initech", "umbrella", "hooli", "soylent"):
            limits = [Check(f"meshtoll_{{{tenant}}}_tenant_{n}", RateLimit(5, "minute")) for n in range(3)]
            await store.check(limits, NOW)
            slot = key_slot(tenant.encode())
            owner = slot_owner(cluster, slot)
            owners.add(owner)
            assert len(counters_in_slot(owner, slot)) == 3
            assert all(counters_in_slot(port, slot) == [] for port in cluster if port != owner)
        assert len(owners) > 1, "six tenants all on one shard: the test proves nothing"
    finally:
        await store.close()


async def test_decisions_stay_exact_on_a_cluster_under_concurrency(cluster: list[int]) -> None:
    stores = [RedisCounterStore(cluster_url(cluster), timeout_ms=2000) for _ in range(2)]
    per_minute = Check("meshtoll_{exact}_tenant_m", RateLimit(30, "minute"))
    daily = Check("meshtoll_{exact}_tenant_d", RateLimit(1000, "day"))
    try:
        results = await asyncio.gather(*(stores[n % 2].check([per_minute, daily], NOW) for n in range(100)))
    finally:
        for store in stores:
            await store.close()
    assert sum(minute.allowed for minute, _ in results) == 30
    assert max(day.used for _, day in results) == 30  # refused requests consumed nothing


async def test_leasing_limiters_on_a_cluster_never_overshoot_and_give_back_what_they_did_not_use(
    cluster: list[int],
) -> None:
    stores = [RedisCounterStore(cluster_url(cluster), timeout_ms=2000) for _ in range(2)]
    # "closed": a decision Redis did not answer fails the test rather than pass uncounted.
    limiters = [Limiter(store, failure_mode="closed", lease_max=16, clock=lambda: NOW) for store in stores]
    per_minute = Check("meshtoll_{leased}_tenant_m", RateLimit(200, "minute"))
    daily = Check("meshtoll_{leased}_tenant_d", RateLimit(100_000, "day"))
    looks = [Check(check.key, check.limit, cost=0) for check in (per_minute, daily)]

    async def client(limiter: Limiter) -> int:
        return sum([(await limiter.check([per_minute, daily])).admitted for _ in range(30)])

    try:
        # Ten concurrent decisions per limiter: redis-py's cluster client caps its connections.
        admitted = sum(await asyncio.gather(*(client(limiters[n % 2]) for n in range(20))))
        for limiter in limiters:
            await limiter.release_leases()
        minute, day = await stores[0].check(looks, NOW)
    finally:
        for store in stores:
            await store.close()
    assert 200 - 2 * 15 <= admitted <= 200
    assert (minute.used, day.used) == (admitted, admitted)


async def test_descriptors_spanning_slots_are_checked_per_slot(cluster: list[int]) -> None:
    store = RedisCounterStore(cluster_url(cluster), timeout_ms=1000)
    checks = [Check(f"domain_key_value{n}", RateLimit(1, "hour")) for n in range(6)]
    assert len({key_slot(f"{check.key}_{window('hour', NOW)[0]}".encode()) for check in checks}) > 1
    try:
        first = await store.check(checks, NOW)
        second = await store.check(checks, NOW)
    finally:
        await store.close()
    assert all(result.allowed for result in first)
    assert not any(result.allowed for result in second)


def test_fused_limits_through_envoy_on_the_cluster(
    cluster: list[int], start_stack: StartStack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    key = "k-cluster"
    path = tmp_path_factory.mktemp("cluster-policy") / "policy.yaml"
    path.write_text(
        "plans: {four: {limits: [{requests: 4, per: hour}]}}\n"
        f"tenants: {{acme: {{plan: four, api_keys: [{{id: k, sha256: {hashlib.sha256(key.encode()).hexdigest()}}}]}}}}\n"
    )
    stack = start_stack(path, redis_url=cluster_url(cluster))
    wait_out_a_window_end("hour", margin=60)  # four an hour, counted exactly
    statuses = [
        fetch(stack.url("listen_http_authz_port", "/x"), headers={"x-api-key": key}).status for _ in range(6)
    ]
    assert statuses == [200] * 4 + [429] * 2


async def test_the_store_finds_the_master_through_sentinel(tmp_path: Path) -> None:
    with redis_sentinel(tmp_path) as (_, sentinel):
        store = RedisCounterStore(f"redis+sentinel://127.0.0.1:{sentinel}/meshtoll", timeout_ms=1000)
        try:
            check = Check("meshtoll_{acme}_tenant_s", RateLimit(2, "minute"))
            results = [await store.check([check], NOW) for _ in range(3)]
            assert [result.allowed for (result,) in results] == [True, True, False]
            assert await store.ping()
        finally:
            await store.close()


async def test_usage_batches_count_once_on_the_cluster(cluster: list[int]) -> None:
    store = RedisUsageStore(cluster_url(cluster))
    try:
        for tenant in ("acme", "globex", "initech"):
            batch = [
                UsageRecord(f"{tenant}-{n}", NOW, tenant, "ci", "pro", "search", "GET", 200, 10, 20, 1.0, 5)
                for n in range(3)
            ]
            assert await store.record(batch) == 3
            assert await store.record(batch[:2]) == 0  # a replayed batch
            usage = await store.usage(tenant, time.strftime("%Y-%m", time.gmtime(NOW)))
            assert (usage.requests, usage.units) == (3, 15)
            assert len(await store.ledger(tenant, NOW - 1, NOW + 1)) == 3
    finally:
        await store.close()
