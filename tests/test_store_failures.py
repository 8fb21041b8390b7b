"""A slow or failing Redis: bounded waits, a circuit breaker that stops waiting, recovery."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio

from meshtoll.counting.limits import Check, RateLimit
from meshtoll.errors import ConfigError, StorageRefused, StorageUnavailable
from meshtoll.storage.breaker import CircuitBreaker
from meshtoll.storage.redis import RedisCounterStore
from meshtoll.storage.redis_access import lua_script
from meshtoll.storage.urls import parse_redis_url
from meshtoll.storage.usage_redis import RedisUsageStore
from meshtoll.usage.records import Admission, ReportedUnits, UsageRecord
from tests.redis_stall import HANG_SECONDS, stalled

CHECK = Check("meshtoll_{slow}_tenant_x", RateLimit(100, "minute"))
# The stores' timeout in these tests: a stalled Redis makes them use all of it, so its size
# changes no outcome, and the calls that must succeed get a wait no loaded machine reaches
# (the 50 ms default made them fail by chance). HANG_SECONDS is 15 of it.
TIMEOUT_MS = 1000


@pytest.mark.integration
async def test_a_stalled_redis_fails_the_call_within_the_timeout(redis_url: str) -> None:
    store = RedisCounterStore(redis_url, timeout_ms=TIMEOUT_MS)
    blocker = redis.asyncio.Redis.from_url(redis_url)
    try:
        await store.check([CHECK], time.time())  # connected and the script loaded
        async with stalled(blocker):
            # Failed while Redis was still stalled: the store gave up on its own timeout.
            with pytest.raises(StorageUnavailable):
                async with asyncio.timeout(HANG_SECONDS):
                    await store.check([CHECK], time.time())
        (result,) = await store.check([CHECK], time.time())  # reconnects by itself
        assert result.allowed
    finally:
        await store.close()
        await blocker.aclose()


def test_the_breaker_opens_after_repeated_failures_and_probes_after_the_cooldown() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=3, cooldown=1.0, clock=lambda: now[0])
    for _ in range(3):
        assert breaker.allows()
        breaker.failed()
    assert not breaker.allows()
    now[0] = 1.01
    assert breaker.allows()  # one probe
    assert not breaker.allows()  # and only one
    breaker.succeeded()
    assert breaker.allows()


async def test_an_open_breaker_fails_fast_without_touching_the_network() -> None:
    # The breaker's clock stands still: however slow the machine, the cooldown never ends
    # before the last call, which the open breaker must refuse itself.
    breaker = CircuitBreaker(threshold=3, cooldown=1.0, clock=lambda: 0.0)
    store = RedisCounterStore("redis://127.0.0.1:1/0", timeout_ms=50, breaker=breaker)
    try:
        for _ in range(3):
            with pytest.raises(StorageUnavailable):
                await store.check([CHECK], time.time())
        assert store.breaker.is_open
        # The breaker's own refusal: no connection was tried for it.
        with pytest.raises(StorageUnavailable, match="circuit breaker is open"):
            await store.check([CHECK], time.time())
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("url", "topology", "nodes"),
    [
        ("redis://localhost:6380/2", "standalone", (("localhost", 6380),)),
        ("redis+sentinel://s1:26379,s2:26379/mymaster/1", "sentinel", (("s1", 26379), ("s2", 26379))),
        ("redis+cluster://a:7000,b:7001", "cluster", (("a", 7000), ("b", 7001))),
        ("redis://a:7000?cluster=true", "cluster", (("a", 7000),)),
    ],
)
def test_redis_urls_name_the_topology(url: str, topology: str, nodes: tuple[tuple[str, int], ...]) -> None:
    target = parse_redis_url(url)
    assert (target.topology, target.nodes) == (topology, nodes)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://x", "scheme must be redis"),
        ("redis+sentinel://s1:26379", "names the service"),
        ("redis://a:1,b:2", "several hosts need"),
        ("redis://a:port", "is not host:port"),
    ],
)
def test_bad_redis_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_redis_url(url)


@pytest.mark.integration
async def test_cancelled_calls_are_not_redis_failures(redis_url: str) -> None:
    store = RedisCounterStore(redis_url, timeout_ms=TIMEOUT_MS)
    try:
        await store.check([CHECK], time.time())  # connected and the script loaded
        for _ in range(store.breaker.threshold + 2):
            # As when Envoy closes the connection or a gRPC deadline passes mid-decision.
            call = asyncio.ensure_future(store.check([CHECK], time.time()))
            await asyncio.sleep(0)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        assert not store.breaker.is_open
        (result,) = await store.check([CHECK], time.time())
        assert result.allowed
    finally:
        await store.close()


def test_a_cancelled_probe_lets_the_next_call_probe() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=1, cooldown=1.0, clock=lambda: now[0])
    breaker.failed()
    now[0] = 2.0
    assert breaker.allows()
    breaker.abandoned()
    assert breaker.allows()


@pytest.mark.integration
async def test_decisions_queued_behind_a_stalled_connection_set_up_fail_within_the_timeout(
    redis_url: str,
) -> None:
    # A fresh store's first calls all wait for one connection, whose SELECT a stalled Redis
    # does not answer: each fails within its own timeout, none waits out the others' (20
    # calls in turn would take 20 timeouts, past HANG_SECONDS), and the breaker counts them.
    store = RedisCounterStore(redis_url.removesuffix("/0") + "/1", timeout_ms=TIMEOUT_MS)
    blocker = redis.asyncio.Redis.from_url(redis_url)
    try:
        async with stalled(blocker), asyncio.timeout(HANG_SECONDS):
            calls = [store.check([CHECK], time.time()) for _ in range(20)]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(outcome, StorageUnavailable) for outcome in outcomes), outcomes
        assert store.breaker.is_open
    finally:
        await store.close()
        await blocker.aclose()


@pytest.mark.integration
async def test_a_redis_that_forgot_its_scripts_loads_them_again_and_counts_once(redis_url: str) -> None:
    # A restarted or flushed Redis answers NOSCRIPT; the script did not run, so the store
    # loads it and sends the call again, and the decision counts exactly once.
    check = Check(f"meshtoll_{{noscript{time.time_ns()}}}_tenant_a", RateLimit(2, "hour"))
    store = RedisCounterStore(redis_url, timeout_ms=1000)
    admin = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert (await store.check([check], time.time()))[0].allowed
        await admin.script_flush()
        assert (await store.check([check], time.time()))[0].allowed
        await admin.script_flush()
        assert not (await store.check([check], time.time()))[0].allowed
    finally:
        await store.close()
        await admin.aclose()


@pytest.mark.integration
async def test_a_script_redis_will_not_load_fails_as_refused_after_one_more_try(redis_url: str) -> None:
    # A user who may run scripts but not load them: after a flush the call's NOSCRIPT makes
    # the client load the script (refused) and send the call once more (NOSCRIPT again). The
    # decision fails as refused, with no third try, having counted nothing; the connection's
    # replies stay in order, so once the script is loaded the next call is answered.
    user = f"noload{time.time_ns()}"
    check = Check(f"meshtoll_{{{user}}}_tenant_a", RateLimit(2, "hour"))
    admin = redis.asyncio.Redis.from_url(redis_url)
    await admin.acl_setuser(
        user, enabled=True, passwords=["+secret"], keys=["*"], commands=["+@all", "-script|load"]
    )
    store = RedisCounterStore(redis_url.replace("redis://", f"redis://{user}:secret@"), timeout_ms=TIMEOUT_MS)
    try:
        await admin.script_flush()
        with pytest.raises(StorageRefused, match=r"^Redis refused the decision script: NOSCRIPT"):
            async with asyncio.timeout(HANG_SECONDS):  # a client that retried forever would hang
                await store.check([check], time.time())
        assert store.errors["refused"] == 1
        await admin.script_load(lua_script("check.lua"))
        (result,) = await store.check([check], time.time())
        assert (result.allowed, result.remaining) == (True, 1)
    finally:
        await store.close()
        await admin.acl_deluser(user)
        await admin.aclose()


@pytest.mark.integration
async def test_the_usage_store_loads_its_script_again_after_a_flush(redis_url: str) -> None:
    tenant = f"noscript{time.time_ns()}"
    store = RedisUsageStore(redis_url)
    admin = redis.asyncio.Redis.from_url(redis_url)
    at = time.time()
    record = UsageRecord(
        "r-1", at, tenant, "ci", "pro", "search", "GET", 200, 100, 2000, 3.5, 5, "access_log"
    )
    try:
        await admin.script_flush()
        assert await store.record([record]) == 1
        await admin.script_flush()
        assert await store.record([record]) == 0  # the replay is still recognised
    finally:
        await store.close()
        await admin.aclose()


RECORD = UsageRecord("r-1", 1.0, "acme", "ci", "pro", "search", "GET", 200, 100, 2000, 3.5, 5, "access_log")
ADMISSION = Admission("r-1", 1.0, "acme", "ci", "pro", "search", "GET", 5)
EVERY_USAGE_CALL: dict[str, Callable[[RedisUsageStore], Awaitable[object]]] = {
    "record": lambda store: store.record([RECORD]),
    "usage": lambda store: store.usage("acme", "2026-12"),
    "ledger": lambda store: store.ledger("acme", 0.0, 2.0),
    "ledger_after": lambda store: store.ledger_after("acme", "0-0", 10),
    "ledger_appended": lambda store: store.ledger_appended(["acme"]),
    "admit": lambda store: store.admit([ADMISSION]),
    "report_units": lambda store: store.report_units([ReportedUnits("acme", "r-1", 7)]),
    "overdue": lambda store: store.overdue(2.0),
    "pending": lambda store: store.pending([("acme", "r-1")]),
    "admitted_tenants": lambda store: store.admitted_tenants(["r-1"]),
    "backlog": lambda store: store.backlog(),
    "tenants": lambda store: store.tenants(),
    "has_usage": lambda store: store.has_usage("acme"),
}


@pytest.mark.parametrize("topology", ["standalone", "sentinel"])
@pytest.mark.parametrize("call", sorted(EVERY_USAGE_CALL))
async def test_every_usage_store_call_to_an_unreachable_redis_fails_as_storage_unavailable(
    call: str, topology: str
) -> None:
    # Port 1: nothing listens there, so every connection is refused. Standalone goes through
    # the lean client for batches and redis-py for reads; Sentinel through redis-py alone.
    url = "redis://127.0.0.1:1/0" if topology == "standalone" else "redis+sentinel://127.0.0.1:1/main/0"
    store = RedisUsageStore(url, timeout_ms=50)
    try:
        with pytest.raises(StorageUnavailable, match=r"^Redis did not"):
            await EVERY_USAGE_CALL[call](store)
    finally:
        await store.close()
