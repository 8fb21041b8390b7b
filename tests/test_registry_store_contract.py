"""The tenant registry's contract, held by the memory store, a standalone Redis, a Redis
behind a real Sentinel and a real three-master Redis Cluster alike: atomic changes with a version check, key-hash uniqueness
among run-time tenants, a change log to follow, audit entries, instances and key use."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import redis.asyncio

from meshtoll.errors import TenantConflict
from meshtoll.local.devstack import RedisServer
from meshtoll.registry.records import Commit, InstanceRecord, KeyRecord, TenantRecord
from meshtoll.registry.store import TenantRegistry
from meshtoll.storage.registry_memory import MemoryTenantRegistry
from meshtoll.storage.registry_redis import RedisTenantRegistry
from tests.redis_topologies import redis_cluster, redis_sentinel

NOW = 1_796_000_000.0
# The Redis registries' socket timeout here: a blocked read may wait half of it (30 s), past
# HANG_SECONDS, so a reader that was not woken shows as a hang, never as a slow answer.
TIMEOUT_SECONDS = 60.0
READER_WAIT_SECONDS = 30.0
# A bound on a hang, never a measurement: a woken reader answers in milliseconds.
HANG_SECONDS = 15.0


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    # Its own Redis: the registry's keys are global, and each test here starts from none.
    with RedisServer(tmp_path_factory.mktemp("registry-redis")) as redis:
        yield redis


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    with redis_sentinel(tmp_path_factory.mktemp("registry-sentinel")) as ports:
        yield ports


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    with redis_cluster(tmp_path_factory.mktemp("registry-cluster")) as ports:
        yield ports


def flush(port: int) -> None:
    subprocess.run(["redis-cli", "-p", str(port), "FLUSHALL"], check=True, capture_output=True, timeout=30)


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.integration),
        pytest.param("sentinel", marks=pytest.mark.integration),
        pytest.param("cluster", marks=pytest.mark.integration),
    ]
)
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[TenantRegistry]:
    store: TenantRegistry
    if request.param == "memory":
        store = MemoryTenantRegistry()
    elif request.param == "redis":
        redis: RedisServer = request.getfixturevalue("standalone")
        flush(redis.port)
        store = RedisTenantRegistry(redis.url, timeout_seconds=TIMEOUT_SECONDS)
    elif request.param == "sentinel":
        master, watcher = request.getfixturevalue("sentinel")
        flush(master)
        store = RedisTenantRegistry(
            f"redis+sentinel://127.0.0.1:{watcher}/meshtoll", timeout_seconds=TIMEOUT_SECONDS
        )
    else:
        ports: list[int] = request.getfixturevalue("cluster")
        for port in ports:
            flush(port)
        nodes = ",".join(f"127.0.0.1:{port}" for port in ports)
        store = RedisTenantRegistry(f"redis+cluster://{nodes}", timeout_seconds=TIMEOUT_SECONDS)
    yield store
    await store.close()


@pytest.fixture
def waiting_readers(request: pytest.FixtureRequest, registry: TenantRegistry) -> Callable[[], Awaitable[int]]:
    """How many readers wait in `registry.changes` now: the memory registry's waiters on its
    condition, or the blocked clients of every Redis node the registry reaches."""
    backend = request.node.callspec.params["registry"]
    if isinstance(registry, MemoryTenantRegistry):
        condition = registry._changed

        async def waiters() -> int:
            return len(condition._waiters)

        return waiters
    if backend == "redis":
        ports = [request.getfixturevalue("standalone").port]
    elif backend == "sentinel":
        ports = [request.getfixturevalue("sentinel")[0]]
    else:
        ports = request.getfixturevalue("cluster")

    async def blocked() -> int:
        total = 0
        for port in ports:
            async with redis.asyncio.Redis(host="127.0.0.1", port=port) as node:
                total += int((await node.info("clients"))["blocked_clients"])
        return total

    return blocked


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def record(name: str, plan: str = "pro", *hashes: str) -> TenantRecord:
    keys = tuple(KeyRecord(f"k{n}", value, "", NOW) for n, value in enumerate(hashes))
    return TenantRecord(name, {"plan": plan}, keys, NOW, NOW)


def create(name: str, *hashes: str, plan: str = "pro") -> Commit:
    return Commit(name, 0, record(name, plan, *hashes), {"action": "tenant.create", "tenant": name}, hashes)


async def test_a_created_tenant_reads_back_with_the_version_its_change_made(registry: TenantRegistry) -> None:
    first = await registry.commit(create("acme", digest("a")))
    second = await registry.commit(create("globex"))
    assert (first, second) == (1, 2)
    found = await registry.get("acme")
    assert found is not None
    assert (found.version, found.spec, [key.sha256 for key in found.keys]) == (
        1,
        {"plan": "pro"},
        [digest("a")],
    )
    assert await registry.get("nobody") is None
    assert await registry.head() == (2, (await registry.changes("", 0))[-1].cursor)


async def test_a_change_from_a_stale_version_changes_nothing(registry: TenantRegistry) -> None:
    await registry.commit(create("acme"))
    with pytest.raises(TenantConflict) as exists:
        await registry.commit(create("acme", plan="free"))
    assert (exists.value.kind, exists.value.current) == ("stale", 1)
    await registry.commit(Commit("acme", 1, record("acme", "free"), {"action": "tenant.update"}))
    with pytest.raises(TenantConflict) as stale:
        await registry.commit(Commit("acme", 1, record("acme", "gold"), {"action": "tenant.update"}))
    assert (stale.value.kind, stale.value.current) == ("stale", 2)
    found = await registry.get("acme")
    assert found is not None
    assert (found.version, found.spec["plan"]) == (2, "free")
    with pytest.raises(TenantConflict):
        await registry.commit(Commit("ghost", 3, None, {"action": "tenant.delete"}))
    assert (await registry.head())[0] == 2


async def test_a_key_hash_belongs_to_one_tenant_until_it_lets_go(registry: TenantRegistry) -> None:
    await registry.commit(create("acme", digest("shared")))
    with pytest.raises(TenantConflict) as taken:
        await registry.commit(create("globex", digest("shared")))
    assert (taken.value.kind, taken.value.detail) == ("key_in_use", "acme")
    assert await registry.get("globex") is None
    assert (await registry.head())[0] == 1
    # The owner may keep its own hash through a change; once deleted, the hash is free.
    await registry.commit(
        Commit(
            "acme",
            1,
            record("acme", "free", digest("shared")),
            {"action": "tenant.update"},
            (digest("shared"),),
        )
    )
    await registry.commit(
        Commit("acme", 2, None, {"action": "tenant.delete"}, removed_hashes=(digest("shared"),))
    )
    await registry.commit(create("globex", digest("shared")))
    found = await registry.get("globex")
    assert found is not None
    assert found.key_hashes() == {digest("shared")}


async def test_the_change_log_names_each_change_once_in_order_and_wakes_a_waiting_reader(
    registry: TenantRegistry, waiting_readers: Callable[[], Awaitable[int]]
) -> None:
    await registry.commit(create("acme"))
    seen = await registry.changes("", 0)
    assert [(change.version, change.tenant) for change in seen] == [(1, "acme")]
    assert await registry.changes(seen[-1].cursor, 0) == []

    # The reader would wait 30 s, past the hang bound: only the commit's wake-up ends its wait
    # in time. The commit comes once the reader is seen waiting, not after a guessed pause.
    async with asyncio.timeout(HANG_SECONDS):
        reader = asyncio.create_task(registry.changes(seen[-1].cursor, wait_seconds=READER_WAIT_SECONDS))
        while not await waiting_readers():
            await asyncio.sleep(0.01)
        await registry.commit(create("globex"))
        woken = await reader
    assert [(change.version, change.tenant) for change in woken] == [(2, "globex")]


async def test_a_snapshot_holds_every_record_as_of_its_head(registry: TenantRegistry) -> None:
    for n in range(25):
        await registry.commit(create(f"t{n}", digest(f"t{n}")))
    await registry.commit(Commit("t3", 4, None, {"action": "tenant.delete"}))
    snapshot = await registry.snapshot()
    assert snapshot.version == 26
    assert sorted(found.name for found in snapshot.records) == sorted(f"t{n}" for n in range(25) if n != 3)
    assert snapshot.cursor == (await registry.head())[1]
    assert snapshot.unreadable == []


async def test_audit_entries_carry_the_version_and_read_on_from_a_cursor(registry: TenantRegistry) -> None:
    for n in range(5):
        await registry.commit(create(f"t{n}"))
    first, cursor = await registry.audit("", 2)
    assert [(entry["tenant"], entry["version"]) for entry in first] == [("t0", 1), ("t1", 2)]
    rest, end = await registry.audit(cursor, 10)
    assert [entry["version"] for entry in rest] == [3, 4, 5]
    assert await registry.audit(end, 10) == ([], end)


async def test_instances_that_stop_reporting_disappear(registry: TenantRegistry) -> None:
    await registry.heartbeat(InstanceRecord("a", "host-a", 1, NOW, 3, NOW), 10)
    await registry.heartbeat(InstanceRecord("b", "host-b", 2, NOW, 2, NOW + 8), 10)
    assert [i.id for i in await registry.instances(NOW + 9, 10)] == ["a", "b"]
    await registry.heartbeat(InstanceRecord("b", "host-b", 2, NOW, 3, NOW + 12), 10)
    found = await registry.instances(NOW + 12, 10)
    assert [(i.id, i.version) for i in found] == [("b", 3)]


async def test_key_use_is_kept_per_key_and_forgotten_with_it(registry: TenantRegistry) -> None:
    await registry.commit(create("acme", digest("a")))
    await registry.record_key_use({("acme", "k0"): 29_933_000, ("acme", "k9"): 29_933_001})
    assert await registry.key_use("acme", ["k0", "k1", "k9"]) == {"k0": 29_933_000, "k9": 29_933_001}
    await registry.commit(Commit("acme", 1, None, {"action": "tenant.delete"}, forgotten_keys=("k0", "k9")))
    assert await registry.key_use("acme", ["k0", "k9"]) == {}


async def test_concurrent_changes_from_a_stale_read_let_exactly_one_through(registry: TenantRegistry) -> None:
    await registry.commit(create("acme"))
    attempts = [
        registry.commit(Commit("acme", 1, record("acme", f"plan{n}"), {"action": "tenant.update"}))
        for n in range(8)
    ]
    outcomes = await asyncio.gather(*attempts, return_exceptions=True)
    assert sum(isinstance(outcome, int) for outcome in outcomes) == 1
    assert all(isinstance(o, TenantConflict) for o in outcomes if not isinstance(o, int))
    assert (await registry.head())[0] == 2


def test_cluster_keys_share_one_slot() -> None:
    from redis.crc import key_slot

    from meshtoll import keys

    names = [
        value for name, value in vars(keys).items() if name.startswith("REGISTRY_") and name.endswith("_KEY")
    ]
    assert len(names) == 8
    assert len({key_slot(name.encode()) for name in names}) == 1


async def test_every_call_to_an_unreachable_redis_is_storage_unavailable() -> None:
    from meshtoll.errors import StorageUnavailable

    # Port 1: nothing listens there (a port chosen as free could be taken by the time of the call).
    store = RedisTenantRegistry("redis://127.0.0.1:1/0", timeout_seconds=0.5)
    try:
        calls = [
            store.get("acme"),
            store.get_many(["acme"]),
            store.commit(create("acme")),
            store.snapshot(),
            store.changes("", 0.1),
            store.head(),
            store.audit("", 10),
            store.heartbeat(InstanceRecord("a", "h", 1, NOW, 0, NOW), 10),
            store.instances(NOW, 10),
            store.record_key_use({("acme", "k"): 1}),
            store.key_use("acme", ["k"]),
        ]
        for call in calls:
            with pytest.raises(StorageUnavailable):
                await call
    finally:
        await store.close()


@pytest.mark.integration
async def test_a_record_edited_by_hand_is_reported_and_never_served(standalone: RedisServer) -> None:
    from meshtoll.errors import StorageRefused
    from meshtoll.keys import REGISTRY_TENANTS_KEY

    flush(standalone.port)
    store = RedisTenantRegistry(standalone.url)
    try:
        await store.commit(create("acme"))
        editor = redis.asyncio.Redis.from_url(standalone.url)
        await editor.hset(REGISTRY_TENANTS_KEY, "evil", '{"version": "x"')
        await editor.aclose()
        with pytest.raises(StorageRefused):
            await store.get("evil")
        assert await store.get_many(["evil", "acme"]) == {"evil": None, "acme": await store.get("acme")}
        snapshot = await store.snapshot()
        assert [record.name for record in snapshot.records] == ["acme"]
        assert [name for name, _ in snapshot.unreadable] == ["evil"]
    finally:
        await store.close()
