"""envoyproxy/ratelimit's HTTP `/json` endpoint (its README's "/json endpoint" and
test/server/server_impl_test.go TestJsonHandler), on `meshtoll ratelimit`'s HTTP port
with envoyproxy/ratelimit's integration configuration and a real Redis."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from meshtoll.local.devstack import RedisServer
from tests.conftest import RunningRls, StartRls

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).parent / "fixtures" / "ratelimit"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runtime")
    shutil.copytree(FIXTURES / "integration", root / "ratelimit")
    return root


@pytest.fixture(scope="module")
def rls(start_rls: StartRls, root: Path) -> RunningRls:
    return start_rls(root)


def post(rls: RunningRls, body: bytes, path: str = "/json") -> tuple[int, str, bytes]:
    call = urllib.request.Request(f"http://127.0.0.1:{rls.port}{path}", data=body, method="POST")
    try:
        with urllib.request.urlopen(call, timeout=5) as reply:
            return reply.status, reply.headers["content-type"], reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["content-type"], error.read()


def one_per_minute(value: str, **request: object) -> bytes:
    descriptor = {"entries": [{"key": "one_per_minute", "value": value}]}
    return json.dumps({"domain": "basic", "descriptors": [descriptor], **request}).encode()


def test_a_request_within_its_limit_is_200_and_over_it_429_with_the_proto3_json_answer(
    rls: RunningRls,
) -> None:
    value = uuid.uuid4().hex
    status, content_type, body = post(rls, one_per_minute(value))
    assert (status, content_type) == (200, "application/json")
    answer = json.loads(body)
    reset = answer["statuses"][0].pop("durationUntilReset")
    assert answer == {
        "overallCode": "OK",
        "statuses": [{"code": "OK", "currentLimit": {"requestsPerUnit": 1, "unit": "MINUTE"}}],
    }
    assert reset.endswith("s")
    assert 0 < int(reset.removesuffix("s")) <= 60
    status, content_type, body = post(rls, one_per_minute(value))
    assert (status, content_type) == (429, "application/json")
    assert json.loads(body)["overallCode"] == "OVER_LIMIT"
    assert json.loads(body)["statuses"][0]["code"] == "OVER_LIMIT"


def test_envoy_json_names_and_proto_field_names_are_both_read(rls: RunningRls) -> None:
    value = uuid.uuid4().hex
    status, _, body = post(rls, one_per_minute(value, hitsAddend=0))  # 0: unset, one hit
    assert (status, json.loads(body)["statuses"][0].get("limitRemaining")) == (200, None)
    status, _, body = post(rls, one_per_minute(uuid.uuid4().hex, hits_addend=2))
    assert (status, json.loads(body)["overallCode"]) == (429, "OVER_LIMIT")


def test_the_answer_is_compact_and_leaves_out_fields_at_their_defaults(rls: RunningRls) -> None:
    unknown = json.dumps({"domain": "nowhere", "descriptors": [{"entries": [{"key": "k", "value": "v"}]}]})
    assert post(rls, unknown.encode()) == (
        200,
        "application/json",
        b'{"overallCode":"OK","statuses":[{"code":"OK"}]}',
    )


@pytest.mark.parametrize(
    "body",
    [
        b"",  # TestJsonHandler: missing request body
        b"}",  # TestJsonHandler: not JSON
        b'{"domain": "foo"}',  # the service refuses a request without descriptors
        b'{"domain": "", "descriptors": [{"entries": [{"key": "k"}]}]}',
        b'{"domain": "basic", "bogus": 1}',  # proto3 JSON knows no such field
        b'{"domain": 5}',
        b"\xff\xfe",
        b"[" * 100_000,
    ],
)
def test_what_is_not_a_rate_limit_request_is_a_plain_text_400(rls: RunningRls, body: bytes) -> None:
    assert post(rls, body) == (400, "text/plain; charset=utf-8", b"Bad Request\n")


def test_the_healthcheck_is_still_served_beside_it(rls: RunningRls) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{rls.port}/healthcheck", timeout=5) as reply:
        assert (reply.status, reply.read()) == (200, b"OK")


def test_redis_down_is_a_503_the_client_may_retry(start_rls: StartRls, root: Path, tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis:
        rls = start_rls(root, REDIS_URL=f"127.0.0.1:{redis.port}", REDIS_TIMEOUT="200ms")
    assert post(rls, one_per_minute("down")) == (503, "text/plain; charset=utf-8", b"Service Unavailable\n")
