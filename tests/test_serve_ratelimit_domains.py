"""`meshtoll serve` answering envoyproxy/ratelimit domains next to its own policy: the
peer's per-limit statistics on the admin port's /metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from tests.client import fetch
from tests.serve import Serving, running_serve

pytestmark = pytest.mark.integration

OK, OVER_LIMIT = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT


def config(domain: str) -> str:
    return f"""
domain: {domain}
descriptors:
  - key: one
    rate_limit: {{unit: minute, requests_per_unit: 1}}
  - key: five
    rate_limit: {{unit: minute, requests_per_unit: 5}}
"""


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    found = tmp_path_factory.mktemp("ratelimit-config")
    for domain in ("peer", "billing"):
        (found / f"{domain}.yaml").write_text(config(domain))
    return found


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory, directory: Path) -> Iterator[Serving]:
    with running_serve(tmp_path_factory.mktemp("serve"), "--ratelimit-config", str(directory)) as found:
        yield found


@pytest.fixture(scope="module")
def rls(serving: Serving) -> Iterator[rls_pb2_grpc.RateLimitServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{serving.grpc_port}") as channel:
        yield rls_pb2_grpc.RateLimitServiceStub(channel)


def ask(
    rls: rls_pb2_grpc.RateLimitServiceStub, domain: str, *keys: tuple[str, str]
) -> rls_pb2.RateLimitResponse:
    descriptors = [
        ratelimit_pb2.RateLimitDescriptor(entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v)])
        for k, v in keys
    ]
    return rls.ShouldRateLimit(rls_pb2.RateLimitRequest(domain=domain, descriptors=descriptors))


def test_per_limit_statistics_are_on_the_admin_metrics(
    serving: Serving, rls: rls_pb2_grpc.RateLimitServiceStub
) -> None:
    codes = [ask(rls, "peer", ("one", "stats")).overall_code for _ in range(3)]
    assert codes == [OK, OVER_LIMIT, OVER_LIMIT]
    text = fetch(f"{serving.admin_url}/metrics").body.decode()
    assert 'ratelimit_service_rate_limit_total_hits{domain="peer",key1="one"} 3' in text
    assert 'ratelimit_service_rate_limit_over_limit{domain="peer",key1="one"} 2' in text
    assert 'ratelimit_service_rate_limit_within_limit{domain="peer",key1="one"} 1' in text
    assert "meshtoll_" in text  # meshtoll's own metrics stay
