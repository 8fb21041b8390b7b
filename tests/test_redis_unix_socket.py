"""meshtoll and a Redis on the same host (a sidecar): `unix:///path/redis.sock` URLs reach a
real redis-server on its Unix socket, for counters, usage and the whole fused decision."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio

from meshtoll.counting.limits import Check, RateLimit
from meshtoll.envoyproxy_ratelimit.environment import redis_url_of
from meshtoll.errors import ConfigError, StorageUnavailable
from meshtoll.local.devstack import RedisServer
from meshtoll.storage.redis import RedisCounterStore
from meshtoll.storage.urls import parse_redis_url, redact_redis_url
from meshtoll.storage.usage_redis import RedisUsageStore
from meshtoll.usage.records import UsageRecord
from tests.client import fetch
from tests.conftest import StartStack
from tests.redis_stall import HANG_SECONDS, stalled
from tests.test_store_failures import TIMEOUT_MS
from tests.waiting import wait_out_a_window_end


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    # In a directory of its own under /tmp: Unix socket paths are limited to 107 bytes.
    with RedisServer(unix_socket=True) as running:
        yield running


@pytest.mark.parametrize(
    ("url", "path", "db", "username", "password"),
    [
        ("unix:///run/redis/redis.sock", "/run/redis/redis.sock", 0, None, None),
        ("unix://:s%40cret@/run/redis.sock?db=3", "/run/redis.sock", 3, None, "s@cret"),
        ("unix://meshtoll:pw@/run/redis.sock", "/run/redis.sock", 0, "meshtoll", "pw"),
        ("unix:///run/redis.sock?db=2&password=pw", "/run/redis.sock", 2, None, "pw"),
    ],
)
def test_unix_urls_name_a_standalone_redis_by_its_socket(
    url: str, path: str, db: int, username: str | None, password: str | None
) -> None:
    target = parse_redis_url(url)
    assert (target.topology, target.unix_socket, target.db) == ("standalone", path, db)
    assert (target.username, target.password) == (username, password)
    if password is not None:
        assert password not in redact_redis_url(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("unix://redis-host/redis.sock", "names a path, not a host"),
        ("unix://", "absolute path"),
        ("unix:///run/redis.sock?db=zero", "is not a number"),
    ],
)
def test_bad_unix_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_redis_url(url)


def test_the_peers_unix_socket_type_becomes_a_unix_url() -> None:
    # envoyproxy/ratelimit's default: REDIS_SOCKET_TYPE=unix, REDIS_URL a socket path.
    assert redis_url_of({"REDIS_URL": "/var/run/redis.sock"}) == "unix:///var/run/redis.sock"
    secret = {"REDIS_URL": "/run/r.sock", "REDIS_AUTH": "pw", "REDIS_SOCKET_TYPE": "UNIX"}
    assert redis_url_of(secret) == "unix://pw@/run/r.sock"
    with pytest.raises(ConfigError, match="without REDIS_TLS=true"):
        redis_url_of({"REDIS_URL": "/run/r.sock", "REDIS_TLS": "true"})


@pytest.mark.integration
async def test_counters_over_the_socket_are_the_counters_over_tcp(server: RedisServer) -> None:
    check = Check("meshtoll_{unix}_tenant_a", RateLimit(3, "hour"))
    # Not a test of timeouts: a wait no loaded machine reaches, not the 50 ms default.
    over_socket = RedisCounterStore(server.unix_url, timeout_ms=2000)
    over_tcp = RedisCounterStore(server.url, timeout_ms=2000)
    try:
        now = time.time()
        assert [(await over_socket.check([check], now))[0].allowed for _ in range(2)] == [True, True]
        (third,) = await over_tcp.check([check], now)
        assert (third.allowed, third.remaining) == (True, 0)
        (fourth,) = await over_socket.check([check], now)
        assert not fourth.allowed
        assert await over_socket.ping()
    finally:
        await over_socket.close()
        await over_tcp.close()


@pytest.mark.integration
async def test_a_stalled_redis_fails_a_socket_call_within_the_timeout(server: RedisServer) -> None:
    check = Check("meshtoll_{unix}_tenant_slow", RateLimit(100, "minute"))
    store = RedisCounterStore(server.unix_url, timeout_ms=TIMEOUT_MS)
    blocker = redis.asyncio.Redis.from_url(server.unix_url)
    try:
        await store.check([check], time.time())  # connected and the script loaded
        async with stalled(blocker):
            # Failed while Redis was still stalled: the store gave up on its own timeout.
            with pytest.raises(StorageUnavailable):
                async with asyncio.timeout(HANG_SECONDS):
                    await store.check([check], time.time())
        (result,) = await store.check([check], time.time())  # reconnects by itself
        assert result.allowed
    finally:
        await store.close()
        await blocker.aclose()


@pytest.mark.integration
async def test_usage_recorded_over_the_socket_is_read_over_tcp(server: RedisServer) -> None:
    at = time.time()
    records = [
        UsageRecord(f"unix-{n}", at, "unix-tenant", "ci", "pro", "search", "GET", 200, 100, 2000, 3.5, 2)
        for n in range(3)
    ]
    over_socket = RedisUsageStore(server.unix_url)
    over_tcp = RedisUsageStore(server.url)
    try:
        assert await over_socket.record(records) == 3
        usage = await over_tcp.usage("unix-tenant", time.strftime("%Y-%m", time.gmtime(at)))
        assert (usage.requests, usage.units) == (3, 6)
    finally:
        await over_socket.close()
        await over_tcp.close()


@pytest.mark.integration
def test_fused_limits_through_envoy_count_in_redis_over_its_socket(
    start_stack: StartStack, server: RedisServer, tmp_path: Path
) -> None:
    key = "k-unix-socket"
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"""
plans:
  two-an-hour: {{limits: [{{requests: 2, per: hour}}]}}
tenants:
  sidecar:
    plan: two-an-hour
    api_keys: [{{id: sidecar-key, sha256: {hashlib.sha256(key.encode()).hexdigest()}}}]
""")
    stack = start_stack(policy, redis_url=server.unix_url)
    wait_out_a_window_end("hour", margin=60)  # two an hour, counted exactly
    statuses = [
        fetch(stack.url("listen_http_authz_port", "/v1/items"), headers={"x-api-key": key}).status
        for _ in range(3)
    ]
    assert statuses == [200, 200, 429]
