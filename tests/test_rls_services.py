"""build_rls(settings) wires `meshtoll ratelimit` from envoyproxy/ratelimit's settings alone:
its answers, health and debug pages can be exercised in-process, with no socket bound and
no task started."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2

from meshtoll.envoyproxy_ratelimit.environment import RlsSettings
from meshtoll.errors import PolicyError
from meshtoll.ratelimit.rls import REMEMBERED_REQUEST_BYTES
from meshtoll.server.rls_services import RlsServices, build_rls
from meshtoll.transport.h2_server import CallContext

FIXTURES = Path(__file__).parent / "fixtures" / "ratelimit"
OK, OVER_LIMIT = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT


async def http(services: RlsServices, path: str, body: bytes = b"") -> bytes:
    reply = services.http("POST", path, {}, "127.0.0.1", body)
    return await reply if isinstance(reply, Awaitable) else reply


@pytest.fixture
async def services(tmp_path: Path, redis_url: str) -> AsyncIterator[RlsServices]:
    """Built on envoyproxy/ratelimit's integration configuration and the session's Redis."""
    shutil.copytree(FIXTURES / "integration" / "config", tmp_path / "config")
    built = await build_rls(RlsSettings(config_directory=tmp_path / "config", redis_url=redis_url))
    try:
        yield built
    finally:
        await built.close()


@pytest.mark.integration
async def test_built_rls_answers_and_reports_its_configuration_without_serving(services: RlsServices) -> None:
    rlconfig = services.debug("GET", "/rlconfig", {}, "127.0.0.1")
    assert rlconfig.endswith(b"\r\n\r\nanother\nbasic\nshare-threshold-test\n")
    # Redis has not been asked yet: unhealthy until serving asks it once.
    assert (await http(services, "/healthcheck")).startswith(b"HTTP/1.1 500 ")
    await services.health.set("redis", await services.store.ping())
    assert (await http(services, "/healthcheck")).startswith(b"HTTP/1.1 200 ")
    descriptor = {"entries": [{"key": "one_per_minute", "value": uuid.uuid4().hex}]}
    request = json.dumps({"domain": "basic", "descriptors": [descriptor]}).encode()
    first, second = [await http(services, "/json", request) for _ in range(2)]
    assert first.startswith(b"HTTP/1.1 200 ")
    assert second.startswith(b"HTTP/1.1 429 ")
    metrics = services.debug("GET", "/metrics", {}, "127.0.0.1")
    assert b'ratelimit_service_rate_limit_over_limit{domain="basic",key1="one_per_minute"} 1' in metrics
    assert set(services.background) == {"rate-limit config watcher", "Redis probe"}


async def test_an_invalid_configuration_fails_the_build_with_its_problems_located(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    shutil.copy(FIXTURES / "config" / "replaces_self.yaml", tmp_path / "config")
    settings = RlsSettings(config_directory=tmp_path / "config", redis_url="redis://127.0.0.1:1/0")
    with pytest.raises(PolicyError, match=r"replaces_self.yaml:10"):
        await build_rls(settings)


@pytest.mark.integration
async def test_large_requests_are_answered_and_counted_but_not_remembered(services: RlsServices) -> None:
    servicer = services.ratelimit

    async def call(value: str) -> int:
        entry = ratelimit_pb2.RateLimitDescriptor.Entry(key="one_per_minute", value=value)
        request = rls_pb2.RateLimitRequest(
            domain="basic", descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[entry])]
        )
        answer = await servicer.should_rate_limit(request.SerializeToString(), CallContext(()))
        code: int = rls_pb2.RateLimitResponse.FromString(answer).overall_code
        return code

    large = uuid.uuid4().hex * (REMEMBERED_REQUEST_BYTES // 32 + 1)
    assert [await call(large) for _ in range(2)] == [OK, OVER_LIMIT]
    # A flood of distinct large requests: each answered, none kept.
    flood = [await call(uuid.uuid4().hex * (REMEMBERED_REQUEST_BYTES // 32 + 1)) for _ in range(50)]
    assert flood == [OK] * 50
    assert servicer.remembered_requests == 0
    small = uuid.uuid4().hex
    assert [await call(small) for _ in range(2)] == [OK, OVER_LIMIT]
    assert servicer.remembered_requests == 1
