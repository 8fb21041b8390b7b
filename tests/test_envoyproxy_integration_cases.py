"""envoyproxy/ratelimit's integration tests (test/integration/integration_test.go), rewritten
for meshtoll: `meshtoll ratelimit` started from envoyproxy/ratelimit's environment variables on its
runtime directory (tests/fixtures/ratelimit/integration, envoyproxy/ratelimit's files unchanged),
spoken to over gRPC on a real Redis. envoyproxy/ratelimit's statsd assertions are left out; its answers
are compared field by field."""

from __future__ import annotations

import random
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshtoll.local.devstack import RedisServer
from tests.conftest import RunningRls, StartRls
from tests.redis_topologies import redis_cluster, redis_sentinel
from tests.waiting import eventually

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).parent / "fixtures" / "ratelimit"
Response = rls_pb2.RateLimitResponse
OK, OVER_LIMIT = Response.OK, Response.OVER_LIMIT
SECOND, MINUTE, HOUR = Response.RateLimit.SECOND, Response.RateLimit.MINUTE, Response.RateLimit.HOUR


def runtime_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runtime")
    shutil.copytree(FIXTURES / "integration", root / "ratelimit")
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return runtime_root(tmp_path_factory)


@pytest.fixture(scope="module")
def rls(start_rls: StartRls, root: Path) -> RunningRls:
    return start_rls(root)


@pytest.fixture(scope="module")
def stub(rls: RunningRls) -> Iterator[rls_pb2_grpc.RateLimitServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{rls.grpc_port}") as channel:
        yield rls_pb2_grpc.RateLimitServiceStub(channel)


def request(domain: str, *descriptors: list[tuple[str, str]], hits: int = 1) -> rls_pb2.RateLimitRequest:
    """envoyproxy/ratelimit's common.NewRateLimitRequest."""
    return rls_pb2.RateLimitRequest(
        domain=domain,
        descriptors=[
            ratelimit_pb2.RateLimitDescriptor(
                entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
            )
            for entries in descriptors
        ],
        hits_addend=hits,
    )


def status(
    code: int, requests: int, unit: int, remaining: int, answer: rls_pb2.RateLimitResponse.DescriptorStatus
) -> object:
    """envoyproxy/ratelimit's newDescriptorStatus: the expected status, with the answer's own reset."""
    return Response.DescriptorStatus(
        code=code,
        current_limit=Response.RateLimit(requests_per_unit=requests, unit=unit),
        limit_remaining=remaining,
        duration_until_reset=answer.duration_until_reset,
    )


def assert_answer(answer: rls_pb2.RateLimitResponse, overall: int, *statuses: object) -> None:
    assert answer == Response(overall_code=overall, statuses=list(statuses))


def test_basic_config(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    """testBasicBaseConfig "WithoutPerSecondRedis": unknown domain, one limit, over a minute
    limit, two descriptors of one domain, and the reset ticking down."""
    basic_config(stub)


@pytest.mark.parametrize(
    ("environment", "local", "stops"),
    [
        ({"LOCAL_CACHE_SIZE_IN_BYTES": "1000"}, True, False),
        ({"CACHE_KEY_PREFIX": "prefix:"}, False, False),
        ({"STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT": "true"}, False, True),
        (
            {"STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT": "true", "LOCAL_CACHE_SIZE_IN_BYTES": "1000"},
            True,
            True,
        ),
    ],
    ids=["local-cache", "cache-key-prefix", "stop-increment", "stop-increment-local-cache"],
)
def test_basic_config_variants(
    start_rls: StartRls, root: Path, environment: dict[str, str], local: bool, stops: bool
) -> None:
    """testBasicConfig's other settings (the same calls; with the local cache, the keys
    ending in `_local` of envoyproxy/ratelimit's basic.yaml and another.yaml)."""
    started = start_rls(root, **environment)
    with grpc.insecure_channel(f"127.0.0.1:{started.grpc_port}") as channel:
        basic_config(rls_pb2_grpc.RateLimitServiceStub(channel), local=local, stops=stops)


def basic_config(
    stub: rls_pb2_grpc.RateLimitServiceStub, *, local: bool = False, stops: bool = False
) -> None:
    def key(name: str) -> str:
        return f"{name}_local" if local else name

    if time.time() % 60 > 55:
        # The calls below must fall in one minute window (envoyproxy/ratelimit's test takes the chance).
        time.sleep(60 - time.time() % 60)

    answer = stub.ShouldRateLimit(request("foo", [(key("hello"), "world")]))
    assert_answer(answer, OK, Response.DescriptorStatus(code=OK))

    answer = stub.ShouldRateLimit(request("basic", [(key("key1"), "foo")]))
    assert_answer(answer, OK, status(OK, 50, SECOND, 49, answer.statuses[0]))

    value = str(random.getrandbits(62))
    for i in range(25):
        answer = stub.ShouldRateLimit(request("another", [(key("key2"), value)]))
        code, remaining = (OVER_LIMIT, 0) if i >= 20 else (OK, 20 - (i + 1))
        assert_answer(answer, code, status(code, 20, MINUTE, remaining, answer.statuses[0]))

    value = str(random.getrandbits(62))
    for i in range(15):
        answer = stub.ShouldRateLimit(request("another", [(key("key2"), value)], [(key("key3"), value)]))
        code, remaining2 = (OVER_LIMIT, 0) if i >= 10 else (OK, 10 - (i + 1))
        # Counting stopped at the limit: key2 no longer grows once key3 refuses.
        remaining1 = 10 if stops and i >= 10 else 20 - (i + 1)
        assert_answer(
            answer,
            code,
            status(OK, 20, MINUTE, remaining1, answer.statuses[0]),
            status(code, 10, HOUR, remaining2, answer.statuses[1]),
        )

    first = stub.ShouldRateLimit(request("another", [(key("key4"), "durTest")]))
    time.sleep(2)  # envoyproxy/ratelimit's own wait: the reset is whole seconds from the real clock
    second = stub.ShouldRateLimit(request("another", [(key("key4"), "durTest")]))
    assert second.statuses[0].duration_until_reset.seconds < first.statuses[0].duration_until_reset.seconds


def test_config_reload_adds_and_removes_a_domain(stub: rls_pb2_grpc.RateLimitServiceStub, root: Path) -> None:
    """testConfigReload: reload.yaml copied in, then removed."""
    blocked = request("reload", [("block", "foo")])
    assert_answer(stub.ShouldRateLimit(blocked), OK, Response.DescriptorStatus(code=OK))
    added = root / "ratelimit" / "config" / "reload.yaml"
    shutil.copy(root / "ratelimit" / "reload.yaml", added)
    try:
        answer = eventually(
            lambda: stub.ShouldRateLimit(request("reload", [("key1", "foo")])),
            lambda answer: answer.statuses[0].HasField("current_limit"),
            timeout=10,
            interval=0.2,
            message="the added reload.yaml never gave key1 its limit",
        )
        assert_answer(answer, OK, status(OK, 50, SECOND, 49, answer.statuses[0]))
        assert stub.ShouldRateLimit(blocked).overall_code == OVER_LIMIT
    finally:
        added.unlink()
    eventually(
        lambda: stub.ShouldRateLimit(blocked),
        lambda answer: answer.overall_code == OK,
        timeout=10,
        interval=0.2,
        message="removing reload.yaml never unblocked the domain",
    )


def test_share_threshold_counts_every_value_of_a_wildcard_together(
    stub: rls_pb2_grpc.RateLimitServiceStub,
) -> None:
    """TestShareThreshold."""
    domain = "share-threshold-test"
    for _ in range(10):
        stub.ShouldRateLimit(request(domain, [("files", "files/a.pdf")]))
    answer = stub.ShouldRateLimit(request(domain, [("files", "files/b.csv")]))
    assert_answer(answer, OVER_LIMIT, status(OVER_LIMIT, 10, HOUR, 0, answer.statuses[0]))
    base = time.time_ns()
    for _ in range(10):
        unique = f"files_no_share/{base}-{random.getrandbits(62)}"
        answer = stub.ShouldRateLimit(request(domain, [("files_no_share", unique)]))
        assert_answer(answer, OK, status(OK, 10, HOUR, 9, answer.statuses[0]))


def test_an_empty_domain_or_no_descriptors_is_a_grpc_error(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    for bad, message in (
        (request("", [("key1", "x")]), "rate limit domain must not be empty"),
        (request("basic"), "rate limit descriptor list must not be empty"),
    ):
        with pytest.raises(grpc.RpcError) as error:
            stub.ShouldRateLimit(bad)
        assert (error.value.code(), error.value.details()) == (grpc.StatusCode.UNKNOWN, message)


def test_health_is_serving_for_the_ratelimit_service_and_on_healthcheck(rls: RunningRls) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{rls.grpc_port}") as channel:
        checked = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="ratelimit")
        )
    assert checked.status == health_pb2.HealthCheckResponse.SERVING
    with urllib.request.urlopen(f"http://127.0.0.1:{rls.port}/healthcheck", timeout=5) as reply:
        assert (reply.status, reply.read()) == (200, b"OK")


def test_counters_are_shared_with_envoyproxy_ratelimit_on_one_redis(
    stub: rls_pb2_grpc.RateLimitServiceStub, redis_url: str
) -> None:
    """A rolling migration: hits the Go service counted (its key, INCRBY) count here too."""
    value = str(random.getrandbits(62))
    now = int(time.time())
    key = f"another_key2_{value}_{now - now % 60}"
    client = redis.Redis.from_url(redis_url)
    try:
        client.incrby(key, 15)
        client.expire(key, 60)
        answer = stub.ShouldRateLimit(request("another", [("key2", value)]))
        assert answer.statuses[0].limit_remaining == 4 or now % 60 == 59  # the minute may turn
        assert int(client.get(key) or 0) == 16
    finally:
        client.close()


def test_basic_config_on_a_redis_cluster(start_rls: StartRls, root: Path, tmp_path: Path) -> None:
    """testBasicConfigAuthWithRedisCluster, without the password: REDIS_TYPE=cluster."""
    with redis_cluster(tmp_path) as ports:
        nodes = ",".join(f"127.0.0.1:{port}" for port in ports)
        started = start_rls(root, REDIS_TYPE="cluster", REDIS_URL=nodes)
        with grpc.insecure_channel(f"127.0.0.1:{started.grpc_port}") as channel:
            basic_config(rls_pb2_grpc.RateLimitServiceStub(channel))


def test_basic_config_through_redis_sentinel(start_rls: StartRls, root: Path, tmp_path: Path) -> None:
    """testBasicAuthConfigWithRedisSentinel, without the password: REDIS_TYPE=sentinel and
    REDIS_URL naming the master, then the sentinels."""
    with redis_sentinel(tmp_path, service="mymaster") as (_, sentinel):
        started = start_rls(root, REDIS_TYPE="sentinel", REDIS_URL=f"mymaster,127.0.0.1:{sentinel}")
        with grpc.insecure_channel(f"127.0.0.1:{started.grpc_port}") as channel:
            basic_config(rls_pb2_grpc.RateLimitServiceStub(channel))


def test_basic_config_with_redis_auth(start_rls: StartRls, root: Path, tmp_path: Path) -> None:
    """testBasicConfigAuth: REDIS_AUTH with the password Redis requires."""
    with RedisServer(tmp_path, arguments=("--requirepass", "password123")) as redis_server:
        started = start_rls(root, REDIS_URL=f"127.0.0.1:{redis_server.port}", REDIS_AUTH="password123")
        with grpc.insecure_channel(f"127.0.0.1:{started.grpc_port}") as channel:
            basic_config(rls_pb2_grpc.RateLimitServiceStub(channel))


def test_an_override_without_a_unit_is_an_error_and_the_service_lives_on(
    stub: rls_pb2_grpc.RateLimitServiceStub,
) -> None:
    asked = request("basic", [("key1", "unitless")])
    asked.descriptors[0].limit.requests_per_unit = 5  # unit left UNKNOWN (0)
    with pytest.raises(grpc.RpcError) as error:
        stub.ShouldRateLimit(asked)
    assert error.value.code() == grpc.StatusCode.UNKNOWN
    assert stub.ShouldRateLimit(request("basic", [("key1", "after")])).overall_code == OK


def test_bytes_that_are_not_a_request_are_a_grpc_error_and_the_service_lives_on(rls: RunningRls) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{rls.grpc_port}") as channel:
        raw = channel.unary_unary("/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit")
        with pytest.raises(grpc.RpcError) as error:
            raw(b"\xff\xff\xff\xff not a protobuf")
        assert error.value.code() == grpc.StatusCode.INTERNAL  # as grpc-go answers the peer's
        answer = rls_pb2.RateLimitResponse.FromString(
            raw(request("basic", [("key1", "bytes")]).SerializeToString())
        )
    assert answer.overall_code == OK
