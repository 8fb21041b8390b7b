"""meshtoll's RLS as a drop-in for envoyproxy/ratelimit: its configuration files served over
the real gRPC protocol, counters under its key format, Envoy's per-descriptor fields honoured."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from envoy.type.v3 import ratelimit_unit_pb2
from google.protobuf import wrappers_pb2

from meshtoll.counting.periods import window
from meshtoll.local.devstack import LocalStack
from tests.client import fetch
from tests.conftest import StartStack
from tests.waiting import eventually

pytestmark = pytest.mark.integration

OK, OVER_LIMIT = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT

CONFIG = """
domain: compat
descriptors:
  - key: remote_address
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: remote_address
    value: 50.0.0.5
    rate_limit: {unit: minute, requests_per_unit: 0}
  - key: ldap
    rate_limit: {unlimited: true}
  - key: client
    rate_limit: {unit: hour, requests_per_unit: 5}
"""


@pytest.fixture(scope="module")
def stack(start_stack: StartStack, tmp_path_factory: pytest.TempPathFactory) -> LocalStack:
    directory = tmp_path_factory.mktemp("rls-compat")
    (directory / "ratelimit").mkdir()
    (directory / "ratelimit" / "compat.yaml").write_text(CONFIG)
    policy = directory / "policy.yaml"
    policy.write_text("plans: {free: {}}\ntenants: {}\n")
    return start_stack(policy, serve_args=("--ratelimit-config", str(directory / "ratelimit")))


@pytest.fixture(scope="module")
def rls(stack: LocalStack) -> Iterator[rls_pb2_grpc.RateLimitServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports.envoy.authz_grpc_port}") as channel:
        yield rls_pb2_grpc.RateLimitServiceStub(channel)


def rejected_reloads(stack: LocalStack) -> float:
    text = fetch(f"{stack.meshtoll_admin_url}/metrics").body.decode()
    sample = "meshtoll_ratelimit_config_rejected_reloads_total "
    return sum(float(line.removeprefix(sample)) for line in text.splitlines() if line.startswith(sample))


def descriptor(*entries: tuple[str, str], hits: int | None = None) -> ratelimit_pb2.RateLimitDescriptor:
    found = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=key, value=value) for key, value in entries]
    )
    if hits is not None:
        found.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits))
    return found


def ask(
    rls: rls_pb2_grpc.RateLimitServiceStub, *descriptors: ratelimit_pb2.RateLimitDescriptor, hits: int = 0
) -> rls_pb2.RateLimitResponse:
    return rls.ShouldRateLimit(
        rls_pb2.RateLimitRequest(domain="compat", descriptors=descriptors, hits_addend=hits)
    )


def test_a_key_without_value_limits_each_value_with_its_own_counter(
    rls: rls_pb2_grpc.RateLimitServiceStub, redis_url: str
) -> None:
    answers = [ask(rls, descriptor(("remote_address", "50.0.0.1"))) for _ in range(4)]
    assert [answer.overall_code for answer in answers] == [OK, OK, OK, OVER_LIMIT]
    status = answers[0].statuses[0]
    assert (status.current_limit.requests_per_unit, status.current_limit.unit) == (
        3,
        rls_pb2.RateLimitResponse.RateLimit.MINUTE,
    )
    assert [answer.statuses[0].limit_remaining for answer in answers[:3]] == [2, 1, 0]
    assert 0 < status.duration_until_reset.seconds <= 60
    assert ask(rls, descriptor(("remote_address", "50.0.0.2"))).overall_code == OK
    # envoyproxy/ratelimit's key format, and its counting: the refused hit counts too.
    start, _ = window("minute", time.time())
    client = redis.Redis.from_url(redis_url)
    try:
        assert int(client.get(f"compat_remote_address_50.0.0.1_{start}") or 0) == 4
    finally:
        client.close()


def test_zero_bans_and_unlimited_reports_max_uint32(rls: rls_pb2_grpc.RateLimitServiceStub) -> None:
    assert ask(rls, descriptor(("remote_address", "50.0.0.5"))).overall_code == OVER_LIMIT
    unlimited = ask(rls, descriptor(("ldap", "any")))
    assert unlimited.overall_code == OK
    assert unlimited.statuses[0].limit_remaining == 2**32 - 1


def test_several_descriptors_are_all_checked_and_any_over_limit_refuses(
    rls: rls_pb2_grpc.RateLimitServiceStub,
) -> None:
    answer = ask(rls, descriptor(("ldap", "x")), descriptor(("remote_address", "50.0.0.5")))
    assert answer.overall_code == OVER_LIMIT
    assert [status.code for status in answer.statuses] == [OK, OVER_LIMIT]
    assert ask(rls, descriptor(("nothing", "configured"))).statuses[0].code == OK


def test_hits_addend_consumes_several_and_zero_only_checks(rls: rls_pb2_grpc.RateLimitServiceStub) -> None:
    assert ask(rls, descriptor(("client", "a")), hits=4).statuses[0].limit_remaining == 1
    looked = ask(rls, descriptor(("client", "a"), hits=0))
    assert (looked.overall_code, looked.statuses[0].limit_remaining) == (OK, 1)
    assert ask(rls, descriptor(("client", "a"))).statuses[0].limit_remaining == 0
    at_the_limit = ask(rls, descriptor(("client", "a"), hits=0))
    assert (at_the_limit.overall_code, at_the_limit.statuses[0].limit_remaining) == (OK, 0)
    # Strict compatibility: refused hits count, as envoyproxy/ratelimit counts them.
    assert ask(rls, descriptor(("client", "a"), hits=2)).overall_code == OVER_LIMIT
    assert ask(rls, descriptor(("client", "a"))).overall_code == OVER_LIMIT


def test_the_limit_envoy_sends_with_a_descriptor_overrides_the_configured_one(
    rls: rls_pb2_grpc.RateLimitServiceStub,
) -> None:
    overridden = descriptor(("client", "b"))
    overridden.limit.CopyFrom(
        ratelimit_pb2.RateLimitDescriptor.RateLimitOverride(requests_per_unit=1, unit=ratelimit_unit_pb2.HOUR)
    )
    assert [ask(rls, overridden).overall_code for _ in range(2)] == [OK, OVER_LIMIT]


def test_a_bad_configuration_file_keeps_the_last_good_one(
    stack: LocalStack, rls: rls_pb2_grpc.RateLimitServiceStub
) -> None:
    directory = Path(stack.config.serve_args[1])
    (directory / "broken.yaml").write_text(
        "domain: other\ndescriptors: [{key: x, rate_limit: {unit: never, requests_per_unit: 1}}]\n"
    )
    eventually(
        lambda: rejected_reloads(stack),
        lambda rejected: rejected >= 1,
        timeout=5,
        message="the bad configuration file was never rejected",
    )
    assert ask(rls, descriptor(("remote_address", "50.0.0.5"))).overall_code == OVER_LIMIT
    log = (stack.work_dir / "meshtoll.log").read_text()
    assert "new version rejected, the previous one stays" in log
    assert "broken.yaml:2 descriptors[0].rate_limit.unit: expected one of second" in log
