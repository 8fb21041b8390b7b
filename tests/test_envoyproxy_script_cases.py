"""envoyproxy/ratelimit's end-to-end scripts (integration-test/scripts/*.sh), as the RLS calls
Envoy makes for them: its examples/envoy/proxy.yaml turns each curl into the descriptors
below (a `request_headers` action whose header is missing drops its whole descriptor;
`apply_on_stream_done` descriptors are sent again after the response). `meshtoll ratelimit`
runs as envoyproxy/ratelimit's docker-compose runs it: its examples/ratelimit/config, dynamic metadata
on. The scripts' own `sleep 60` between windows is left out."""

from __future__ import annotations

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
from google.protobuf import json_format, wrappers_pb2

from tests.conftest import RunningRls, StartRls

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).parent / "fixtures" / "ratelimit" / "examples"
OK, OVER_LIMIT = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT
Entries = list[tuple[str, str]]


@pytest.fixture(scope="module")
def rls(start_rls: StartRls, tmp_path_factory: pytest.TempPathFactory) -> RunningRls:
    root = tmp_path_factory.mktemp("runtime")
    shutil.copytree(EXAMPLES, root / "ratelimit" / "config")
    return start_rls(root, RESPONSE_DYNAMIC_METADATA="true", USE_PROMETHEUS="true")


@pytest.fixture(scope="module")
def stub(rls: RunningRls) -> Iterator[rls_pb2_grpc.RateLimitServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{rls.grpc_port}") as channel:
        yield rls_pb2_grpc.RateLimitServiceStub(channel)


@pytest.fixture(autouse=True)
def one_minute_window() -> None:
    """Every script's calls fall in one minute window (envoyproxy/ratelimit's scripts take the chance)."""
    if time.time() % 60 > 55:
        time.sleep(60 - time.time() % 60)


@pytest.fixture
def fresh_minute(redis_url: str) -> None:
    """The quota scripts share the `service` counters: each starts them empty."""
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter("rl_service_*"):
            client.delete(key)
    finally:
        client.close()


def descriptor(entries: Entries, hits: int | None = None) -> ratelimit_pb2.RateLimitDescriptor:
    found = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )
    if hits is not None:
        found.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits))
    return found


def ask(
    stub: rls_pb2_grpc.RateLimitServiceStub, *descriptors: ratelimit_pb2.RateLimitDescriptor
) -> rls_pb2.RateLimitResponse:
    answer: rls_pb2.RateLimitResponse = stub.ShouldRateLimit(
        rls_pb2.RateLimitRequest(domain="rl", descriptors=descriptors)
    )
    return answer


def curl(stub: rls_pb2_grpc.RateLimitServiceStub, route: str, **headers: str) -> bool:
    """Whether Envoy would pass the request (True) or answer 429, for proxy.yaml's header routes."""
    actions = {
        "twoheader": [["foo", "bar"], ["foo", "baz"]],
        "fourheader": [["foo", "bar"], ["source_cluster", "destination_cluster"]],
        "fiveheader": [["foo", "bar"], ["source_cluster", "destination_cluster"], ["category"]],
        "unspec": [["unspec"]],
    }[route]
    sent = [
        descriptor([(k, headers[k]) for k in keys]) for keys in actions if all(k in headers for k in keys)
    ]
    passed: bool = ask(stub, *sent).overall_code == OK
    return passed


def test_simple_get(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    assert curl(stub, "twoheader", foo="test", baz="shady")


def test_trigger_ratelimit(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    passed = [curl(stub, "twoheader", foo="pelle", baz="not-so-shady") for _ in range(5)]
    assert passed == [True, True, True, False, False]


def test_trigger_shadow_mode_key(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    answers = [ask(stub, descriptor([("foo", "pelle"), ("baz", "shady")])) for _ in range(6)]
    assert [a.overall_code for a in answers] == [OK] * 6
    assert [a.statuses[0].code for a in answers] == [OK] * 6  # the shadow limit reports OK
    assert [a.statuses[0].limit_remaining for a in answers] == [2, 1, 0, 0, 0, 0]


def test_replaces(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    two = {"foo": "bkthomps", "bar": "banned"}
    four = {"foo": "my_foo", "bar": "bkthomps", "source_cluster": "proxy"}
    five = {**four, "destination_cluster": "fake", "category": "account"}
    steps: list[tuple[str, dict[str, str], bool]] = [
        ("twoheader", two, False),
        ("fourheader", {**two, "source_cluster": "proxy", "destination_cluster": "mock"}, False),
        ("fourheader", {**two, "source_cluster": "proxy", "destination_cluster": "override"}, True),
        ("fourheader", {**two, "source_cluster": "proxy", "destination_cluster": "override"}, True),
        ("fourheader", {**two, "source_cluster": "proxy", "destination_cluster": "override"}, False),
        ("fourheader", {**four, "destination_cluster": "bkthomps"}, True),
        ("fourheader", {**four, "destination_cluster": "bkthomps"}, True),
        ("fourheader", {**four, "destination_cluster": "bkthomps"}, False),
        ("fourheader", {**four, "destination_cluster": "not_bkthomps"}, True),
        ("fourheader", {**four, "destination_cluster": "not_bkthomps"}, False),
        ("fourheader", {**four, "destination_cluster": "bkthomps"}, False),
        *[("fiveheader", five, True)] * 4,
        ("fiveheader", five, False),
        ("twoheader", {"foo": "foo_2", "bar": "bkthomps"}, True),
        ("twoheader", {"foo": "foo_2", "bar": "bkthomps"}, False),
        (
            "fourheader",
            {"foo": "foo_3", "bar": "bar_3", "source_cluster": "proxy", "destination_cluster": "fake"},
            True,
        ),
        (
            "fourheader",
            {"foo": "foo_3", "bar": "bar_3", "source_cluster": "proxy", "destination_cluster": "fake"},
            True,
        ),
        (
            "fourheader",
            {"foo": "foo_3", "bar": "bar_3", "source_cluster": "proxy", "destination_cluster": "fake"},
            False,
        ),
        ("fiveheader", five, False),
    ]
    passed = [curl(stub, route, **headers) for route, headers, _ in steps]
    assert passed == [expected for _, _, expected in steps]


def test_value_included_in_stats_key_when_unspecified(
    stub: rls_pb2_grpc.RateLimitServiceStub, rls: RunningRls
) -> None:
    passed = [curl(stub, "unspec", unspec="unspecified_value") for _ in range(3)]
    assert passed == [True, True, False]
    with urllib.request.urlopen(f"http://127.0.0.1:{rls.debug_port}/metrics", timeout=5) as reply:
        metrics = reply.read().decode()
    line = 'ratelimit_service_rate_limit_over_limit{domain="rl",key1="unspec_unspecified_value"} 1'
    assert line in metrics.splitlines()


@pytest.mark.usefixtures("fresh_minute")
def test_quota(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    """/quota: two quota descriptors; refused only once both are over."""
    both = [descriptor([("service", "service_1")]), descriptor([("service", "service_2")])]
    assert [ask(stub, *both).overall_code for _ in range(3)] == [OK, OK, OVER_LIMIT]


@pytest.mark.usefixtures("fresh_minute")
def test_token_quota(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    """/tokenquota: a look (hits 0) before, the charge (hits 1) after each response."""
    passed = []
    for _ in range(4):
        passed.append(ask(stub, descriptor([("service", "service_2")], hits=0)).overall_code == OK)
        if passed[-1]:
            ask(stub, descriptor([("service", "service_2")], hits=1))
    assert passed == [True, True, True, False]


@pytest.mark.usefixtures("fresh_minute")
def test_multiservice_token_quota(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    """/multiservice-tokenquota: the dynamic metadata of the passing descriptors names the
    service Envoy routes to; its locality is charged after the response."""
    routed: list[str | None] = []
    for _ in range(6):
        answer = ask(
            stub,
            descriptor([("service", "service_1")], hits=0),
            descriptor([("service", "service_2")], hits=0),
        )
        if answer.overall_code != OK:
            routed.append(None)
            continue
        metadata = json_format.MessageToDict(answer.dynamic_metadata)
        service = metadata["metadata"]["service_with_quota"]["name"]
        routed.append(service)
        ask(stub, descriptor([("service", service)], hits=1))
    assert routed == ["service_1", "service_1", "service_2", "service_2", "service_2", None]
